"""Evaluating on labelled test data: metrics, test-set thresholds, the scores table, overlays.

  record = metric_record(labels, image_scores, masks, maps)    # image/pixel AUROC, AU-PRO
  test = test_thresholds(labels, image_scores, masks, maps)    # F1-optimal thresholds
  calibration = calibrate_on_test(model.calibration, test)
  write_scores_csv(path, split, labels, [('score', image_scores)])
  write_overlays(directory, split, calibration, settings.image_config, scores, maps, masks, 8)

`score_features` scores test patch features already extracted (a sweep scores many memory
banks against the same features) in zero-padded batches of one compiled shape, through the
exact search or an IVF-PQ index alike (`stages.score`).
"""
import csv
import dataclasses
import io
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax import files
from patchcore_jax import metrics
from patchcore_jax import stages
from patchcore_jax import visualize
from patchcore_jax.data import common as data_common
from patchcore_jax.data import transforms


def metric_record(labels, image_scores, masks=None, maps=None, *, transform=None):
  """{'image_auroc', 'pixel_auroc', 'au_pro'}: the pixel metrics None without `masks`; with a
  'metric_notes' {metric: why it is None} wherever one could not be computed.

  labels [n] 0/1, image_scores [n], masks [n, S, S] bool, maps [n, S, S]. `transform`: how the
  masks were cut to the network input ('resize 256, centre crop 224'), for the notes.
  """
  has_masks = masks is not None
  record = {
      'image_auroc': metrics.image_auroc(labels, image_scores),
      'pixel_auroc': metrics.pixel_auroc(masks, maps) if has_masks else None,
      'au_pro': metrics.au_pro(masks, maps) if has_masks else None,
  }
  notes = unavailable_metrics(labels, masks, transform=transform)
  notes = {k: v for k, v in notes.items() if record[k] is None}
  if notes:
    record['metric_notes'] = notes
  return record


def unavailable_metrics(labels, masks=None, *, transform=None):
  """{metric: why it cannot be computed} for test data with these labels and masks."""
  notes = {}
  labels = np.asarray(labels)
  if labels.size == 0:
    notes['image_auroc'] = 'there are no test images'
  elif labels.min() == labels.max():
    notes['image_auroc'] = (f'every test image is {"defective" if labels[0] else "good"}: image '
                            'AUROC needs both good and defective images')
  if masks is None:
    why = 'the test data has no ground-truth masks'
    notes.update(pixel_auroc=why, au_pro=why)
    return notes
  masks = np.asarray(masks)
  if not masks.any():
    cut = f' after the image transform ({transform})' if transform else ''
    why = (f'no test mask has a defective pixel{cut}: pixel AUROC and AU-PRO need defective '
           'pixels' + (' (the defects lie outside the inspected region?)' if transform else ''))
    notes.update(pixel_auroc=why, au_pro=why)
  elif masks.all():
    notes['pixel_auroc'] = 'every test pixel is defective: pixel AUROC needs good pixels too'
  return notes


def describe_transform(image_config):
  """'resize 256, centre crop 224' or 'resize to 224 x 224' for `Settings.image_config`."""
  if image_config.get('transform') == 'resize':
    return f'resize to {image_config["image_size"]} x {image_config["image_size"]}'
  return f'resize {image_config["resize"]}, centre crop {image_config["image_size"]}'


def test_thresholds(labels, image_scores, masks=None, maps=None):
  """The F1-optimal thresholds of labelled test data: f1_image_threshold, image_f1,
  misclassified (test images on the wrong side of it) and, with masks, f1_pixel_threshold and
  pixel_f1 (keys absent where a threshold does not exist: one class only)."""
  threshold, f1 = metrics.f1_optimal_threshold(labels, image_scores)
  test = {}
  if threshold is not None:
    test.update(f1_image_threshold=threshold, image_f1=f1,
                misclassified=int(np.sum((np.asarray(image_scores) > threshold) != labels)))
  if masks is not None:
    pixel_threshold, pixel_f1 = metrics.f1_optimal_threshold(masks, maps)
    if pixel_threshold is not None:
      test.update(f1_pixel_threshold=pixel_threshold, pixel_f1=pixel_f1)
  return test


def calibrate_on_test(calibration, test):
  """`calibration` with the test thresholds `test` (`test_thresholds`) recorded.

  The decision threshold stays the held-out one when the fit had a holdout; otherwise it becomes
  the F1-optimal one (source 'test_f1'). The pixel threshold becomes the F1-optimal pixel one.
  """
  changes = dict(test=tuple(sorted(test.items())))
  if calibration.image_threshold is None and 'f1_image_threshold' in test:
    changes.update(image_threshold=test['f1_image_threshold'], image_threshold_source='test_f1',
                   pixel_threshold=test['f1_image_threshold'], pixel_threshold_source='test_f1')
  if 'f1_pixel_threshold' in test:
    changes.update(pixel_threshold=test['f1_pixel_threshold'], pixel_threshold_source='test_f1')
  return dataclasses.replace(calibration, **changes)


def score_features(bank, feats, settings, *, nprobe=None, cache=stages.DEFAULT_CACHE):
  """Scores test patch features feats [n, h, w, D] against `bank` (a `knn.Bank`, or an
  `ivfpq.Index` searched with `nprobe`) as a fitted model would, in batches of
  `settings.batch_size` (the last zero-padded).

  Returns:
    (image scores [n], maps [n, S, S], each patch's nearest bank row [n, h * w], seconds of
    compute: every batch waited for, the first compiled and warmed up outside the timing).
  """
  n, bs = len(feats), settings.batch_size
  image_scores = np.empty((n,), np.float32)
  maps = np.empty((n, settings.image_size, settings.image_size), np.float32)
  nearest = np.empty((n, feats.shape[1] * feats.shape[2]), np.int32)
  compute = 0.0
  for i in range(0, n, bs):
    count = min(bs, n - i)
    chunk = jnp.asarray(data_common.pad_batch(feats[i:i + bs], bs))
    run = lambda: stages.score_batch(bank, chunk, settings, with_index=True, nprobe=nprobe,
                                     cache=cache)
    if i == 0:  # Compiles (once per shape) and warms up outside the timed calls.
      jax.block_until_ready(run())
    begin = time.perf_counter()
    scores, batch_maps, _, batch_nearest = jax.block_until_ready(run())
    compute += time.perf_counter() - begin
    image_scores[i:i + count] = np.asarray(scores)[:count]
    maps[i:i + count] = np.asarray(batch_maps)[:count]
    nearest[i:i + count] = np.asarray(batch_nearest)[:count]
  return image_scores, maps, nearest, compute


def write_scores_csv(path, split, labels, columns):
  """path,label and one column of image scores per (name, scores [n]) in `columns`, a row per
  test image of `split` (paths relative to its root); written atomically."""
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(['path', 'label'] + [name for name, _ in columns])
  for i, (sample, label) in enumerate(zip(split.test, labels)):
    writer.writerow([split.relative(sample.path), int(label)]
                    + [repr(float(scores[i])) for _, scores in columns])
  files.write_text(path, out.getvalue())


def overlay_indices(split, count):
  """Up to `count` test images: mostly anomalous ones, spread over defect types, plus good ones."""
  bad = [i for i, s in enumerate(split.test) if s.label == 1]
  good = [i for i, s in enumerate(split.test) if s.label == 0]
  n_good = min(len(good), max(1, count // 4))
  pick = lambda xs, n: [xs[int(j)] for j in np.linspace(0, len(xs) - 1, n)] if n and xs else []
  return sorted(set(pick(bad, min(len(bad), count - n_good)) + pick(good, n_good)))


def write_overlays(directory, split, calibration, image_config, image_scores, maps, masks, count):
  """Labelled overlays of up to `count` test images of `split` (`overlay_indices`), coloured on
  the calibration's fixed scale; images decoded again at `image_config`."""
  color_range = calibration.color_range
  if count <= 0:
    return
  if color_range is None:  # Only without any threshold (no holdout and no labelled test data).
    logging.warning('[%s] no threshold, so no fixed colour scale: overlays not written',
                    split.name)
    return
  os.makedirs(directory, exist_ok=True)
  for i in overlay_indices(split, count):
    sample = split.test[i]
    image = transforms.load_image(data_common.open_file(sample, sample.path), **image_config)
    stem = os.path.splitext(os.path.basename(sample.path))[0]
    lines, ticks = visualize.caption(split.relative(sample.path), image_scores[i], calibration)
    files.save_png(
        os.path.join(directory, f'{sample.defect}_{stem}.png'),
        visualize.labelled_overlay(image, maps[i], masks[i], vmin=color_range[0],
                                   vmax=color_range[1], lines=lines, ticks=ticks))
