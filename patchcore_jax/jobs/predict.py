"""run(config, workdir): score new images with a saved model (configs/predict.py).

  python launch.py --config=configs/predict.py --config.model=MODEL_DIR --config.images=PATH \
      --workdir=OUT

PATH is a folder (searched recursively for images), a glob pattern, a text file with one image
path per line (relative paths are relative to the text file), or one image file.

Writes into OUT:
  predictions.csv   path,score,normalized_score,anomalous,error per image, in input order; path
                    relative to PATH for a folder (else to the images' common folder); written
                    under a temporary name and renamed when the run ends
  overlays/<path>.png  labelled overlays (input | map | blend, fixed colour scale [0, 2 x
                    threshold], file name, score, threshold and decision), with output.overlays
  masks/<path>.png  binary defect masks at the image's ORIGINAL resolution, with output.masks: the
                    map taken back through the crop and the resize, defective above the model's
                    pixel threshold; with the 'resize_crop' transform the border outside the centre
                    crop was never inspected and is 0 (not defective)
  maps/<path>.npy   raw float32 maps at the network's input size, with output.save_maps
  summary.json      counts, timings (images/s), peak memory, the model and threshold used
  status.json       'running' until the end, then 'complete' (or 'failed'); see `workdir`
A workdir holding another run's outputs is refused unless output.overwrite is set.

Images stream through in batches (memory stays flat however many there are). A file that cannot
be read gets a row with its error and the rest go on. Exit status (launch.py): 0 when every image
was scored, 1 when some could not be read, 2 for a user error (no model, no images).
"""
import csv
import dataclasses
import glob
import os
import time

from absl import logging
import numpy as np

from patchcore_jax import errors
from patchcore_jax import files
from patchcore_jax import model as model_lib
from patchcore_jax import patchcore
from patchcore_jax import saving
from patchcore_jax import stages
from patchcore_jax import timing
from patchcore_jax import visualize
from patchcore_jax.data import common as data_common
from patchcore_jax.data import transforms
from patchcore_jax.jobs import workdir as workdir_lib

COLUMNS = ('path', 'score', 'normalized_score', 'anomalous', 'error')
OUTPUTS = ('predictions.csv', 'summary.json', 'overlays', 'masks', 'maps')


def resolve_images(spec):
  """(sorted image paths, base folder for relative names) of a folder, glob, list file or image."""
  if not spec:
    raise errors.UserError('config.images is empty: set --config.images=FOLDER|GLOB|LIST.txt|IMAGE')
  is_image = lambda p: p.lower().endswith(data_common.IMAGE_EXTENSIONS)
  if os.path.isdir(spec):
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(spec)
                   for name in names if is_image(name))
    base = spec
  elif os.path.isfile(spec) and is_image(spec):
    paths, base = [spec], os.path.dirname(spec)
  elif os.path.isfile(spec):
    folder = os.path.dirname(os.path.abspath(spec))
    with open(spec) as f:
      lines = [line.strip() for line in f]
    paths = [p if os.path.isabs(p) else os.path.join(folder, p)
             for p in lines if p and not p.startswith('#')]
    base = None
  elif any(c in spec for c in '*?['):
    paths = sorted(p for p in glob.glob(spec, recursive=True) if is_image(p))
    base = None
  else:
    raise errors.UserError(f'config.images={spec!r}: no such folder, image, list file or matches')
  if not paths:
    raise errors.UserError(f'config.images={spec!r}: no images found (extensions: '
                           f'{", ".join(data_common.IMAGE_EXTENSIONS)})')
  if base is None:
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  return paths, base


def _load(path, image_config):
  """(network input [S, S, 3] float32, original (width, height))."""
  return transforms.load_image(path, **image_config, return_size=True)


def _peak_rss_mb():
  return timing.peak_rss_bytes() / 2**20


def run(config, workdir):
  """Scores config.images with the model in config.model; see the module docstring.

  Returns:
    The summary dict (also in workdir/summary.json); its 'exit_status' is 0 when every image was
    scored, else 1.
  """
  if not config.model:
    raise errors.UserError('config.model is empty: set --config.model=MODEL_DIR (a folder written '
                           'by an experiment run under WORKDIR/models/<category>, or by save())')
  model = saving.load(config.model, checkpoint=config.checkpoint, cache_dir=config.cache_dir)
  if config.batch_size > 0:
    model = model.replace(settings=dataclasses.replace(model.settings,
                                                       batch_size=config.batch_size))
  if config.threshold >= 0:
    model = model_lib.with_threshold(model, config.threshold)
  paths, base = resolve_images(config.images)
  if model.calibration.image_threshold is None:
    logging.warning('the model has no threshold (fitted without holdout or labelled test data): '
                    'no decisions, masks or overlays; set --config.threshold to add one')
  status = workdir_lib.claim(workdir, job='predict', outputs=OUTPUTS,
                             overwrite=config.output.overwrite)
  try:
    summary = _score_all(config, workdir, model, paths, base)
  except BaseException as error:
    workdir_lib.finish(workdir, status, error=error)
    raise
  workdir_lib.finish(workdir, status)
  return summary


def _score_all(config, workdir, model, paths, base):
  """Scores `paths` into workdir; returns the summary."""
  cal, settings = model.calibration, model.settings
  csv_path = os.path.join(workdir, 'predictions.csv')
  tmp_path = csv_path + '.tmp'
  logging.info('scoring %d images from %s with %s (memory bank %d, threshold %s from %s)',
               len(paths), config.images, config.model, model.memory_bank_size,
               cal.image_threshold, cal.image_threshold_source)
  stages.precompile(model.backbone, settings, model.bank)
  start = time.perf_counter()
  scored = failed = 0
  compute_seconds = 0.0
  last_log = start
  bar = timing.progress_bar(len(paths), 'predict', config.output.progress)
  with open(tmp_path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(COLUMNS)
    for loaded in data_common.map_in_batches(
        lambda p: _load(p, settings.image_config), paths, batch_size=settings.batch_size,
        num_workers=config.num_workers):
      ok = [(p, value) for p, value, error in loaded if error is None]
      results = {}
      if ok:
        images = data_common.pad_batch([value[0] for _, value in ok], settings.batch_size)
        batch = data_common.Batch(images, len(ok))
        scores, maps, _, seconds = patchcore.predict_batch(model, batch)
        compute_seconds += seconds
        normalized, anomalous = model_lib.decide(cal, scores)
        for i, (path, (image, size)) in enumerate(ok):
          results[path] = (scores[i], None if normalized is None else normalized[i],
                           None if anomalous is None else anomalous[i], maps[i], image, size)
      for path, _, error in loaded:
        name = os.path.relpath(os.path.abspath(path), os.path.abspath(base))
        if error is not None:
          failed += 1
          writer.writerow([name, '', '', '', f'{type(error).__name__}: {error}'])
          logging.warning('cannot read %s: %s', path, error)
          continue
        scored += 1
        score, norm, decision, anomaly_map, image, size = results[path]
        writer.writerow([name, repr(float(score)), '' if norm is None else repr(float(norm)),
                         '' if decision is None else int(decision), ''])
        _write_outputs(workdir, name, model, config.output, score, anomaly_map, image, size)
      if bar is not None:
        bar.update(len(loaded))
      now = time.perf_counter()
      if now - last_log > 10:
        last_log = now
        logging.info('%d/%d images (%.1f images/s), peak RSS %.0f MB', scored + failed,
                     len(paths), (scored + failed) / (now - start), _peak_rss_mb())
  if bar is not None:
    bar.close()
  os.replace(tmp_path, csv_path)
  seconds = time.perf_counter() - start
  summary = {
      'model': os.path.abspath(config.model), 'images': config.images,
      'num_images': len(paths), 'num_scored': scored, 'num_failed': failed,
      'seconds': seconds, 'images_per_second': (scored + failed) / seconds,
      'compute_seconds_per_image': compute_seconds / max(scored, 1),
      'peak_rss_mb': _peak_rss_mb(), 'batch_size': settings.batch_size,
      'image_threshold': cal.image_threshold, 'image_threshold_source': cal.image_threshold_source,
      'pixel_threshold': cal.pixel_threshold,
      'exit_status': 0 if failed == 0 else 1,
  }
  files.write_json(os.path.join(workdir, 'summary.json'), summary)
  logging.info('scored %d of %d images in %.1f s (%.1f images/s, %.1f ms compute per image), '
               '%d unreadable; peak RSS %.0f MB; %s', scored, len(paths), seconds,
               summary['images_per_second'], 1000 * summary['compute_seconds_per_image'], failed,
               summary['peak_rss_mb'], csv_path)
  return summary


def _write_outputs(workdir, name, model, output, score, anomaly_map, image, size):
  stem = os.path.splitext(name)[0]
  cal = model.calibration
  if output.save_maps:
    files.save_npy(os.path.join(workdir, 'maps', stem + '.npy'), anomaly_map.astype(np.float32))
  if cal.image_threshold is None:
    return
  if output.overlays:
    vmin, vmax = cal.color_range
    lines, ticks = visualize.caption(name, score, cal)
    files.save_png(os.path.join(workdir, 'overlays', stem + '.png'), visualize.labelled_overlay(
        image, anomaly_map, None, vmin=vmin, vmax=vmax, lines=lines, ticks=ticks))
  if output.masks:
    full = transforms.map_to_original(anomaly_map, size, **model.settings.image_config)
    files.save_png(os.path.join(workdir, 'masks', stem + '.png'),
                   np.where(full > cal.pixel_threshold, 255, 0).astype(np.uint8))


def exit_status(summary):
  return summary['exit_status']
