"""run(config, workdir): PatchCore on every category of a dataset, from images to metrics.

Each category is `patchcore.fit` on its training images and `patchcore.predict_batches` on its
test images, then evaluated; the fitted model, calibrated with the F1-optimal thresholds of the
labelled test data (and the held-out good images when `calibration.holdout` > 0), is saved.

Before any work the whole config is checked (`validate_config`), every image and mask file is
checked from its header (`data.check_split`), and the workdir is claimed (`workdir.claim`: a
workdir holding another run's outputs is refused unless `output.overwrite`).

Writes into `workdir` (every file atomically):
  status.json                  'running' until the end, then 'complete' (or 'failed' + error);
                               the categories done so far
  config.json                  the full config
  results.json                 {category: {image_auroc, pixel_auroc, au_pro, memory_bank_size,
                                fit_seconds, inference_seconds_per_image, thresholds, ...}}
  results.md                   the same as a table
  scores/<category>.csv        path,label,score per test image
  maps/<category>/*.png        labelled overlays for some test images: input | map | blend
  models/<category>/           the fitted model (`saving.load`), with output.save_model
"""
import csv
import dataclasses
import io
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from patchcore_jax import backbones
from patchcore_jax import data as data_lib
from patchcore_jax import errors
from patchcore_jax import metrics
from patchcore_jax import multihost
from patchcore_jax import patchcore
from patchcore_jax import saving
from patchcore_jax import sharded
from patchcore_jax import visualize
from patchcore_jax import workdir as workdir_lib

# What a run writes into its workdir (what a second run must not mix with).
OUTPUTS = ('config.json', 'results.json', 'results.md', 'scores', 'maps', 'models')


def settings_from_config(config):
  """The `patchcore.Settings` a config describes."""
  dc, fc, cc, kc, sc = config.data, config.features, config.coreset, config.knn, config.scoring
  return patchcore.Settings(
      transform=dc.transform, resize=dc.resize, image_size=dc.image_size,
      patch_size=fc.patch_size, stride=fc.patch_stride, pretrain_dim=fc.pretrain_dim,
      target_dim=fc.target_dim, percentage=cc.percentage, projection_dim=cc.projection_dim,
      num_starts=cc.num_starts, seed=config.seed, k=kc.k, block_size=kc.block_size,
      precision=kc.precision, screen=kc.screen, distance=sc.distance, sigma=sc.sigma,
      reweight=sc.reweight, reweight_neighbours=sc.reweight_neighbours,
      batch_size=dc.batch_size).validate()


def _check(field, value, ok, allowed):
  if not ok:
    raise errors.UserError(f'config.{field}={value!r} is not allowed: must be {allowed}')


def validate_config(config):
  """Checks every field of an experiment config before any work; raises errors.UserError naming
  the field, its value and what is allowed. Returns the `patchcore.Settings` it describes."""
  dc, bb, cal, out = config.data, config.backbone, config.calibration, config.output
  _check('data.name', dc.name, dc.name in data_lib.DATASETS, f'one of {data_lib.DATASETS}')
  _check('data.source', dc.source, dc.source in data_lib.SOURCES, f'one of {data_lib.SOURCES}')
  if dc.name == 'mvtec':
    unknown = [c for c in dc.categories if c not in data_lib.MVTEC_CATEGORIES]
    _check('data.categories', tuple(dc.categories),
           tuple(dc.categories) == ('all',) or (dc.categories and not unknown),
           f"MVTec AD categories, some of {data_lib.MVTEC_CATEGORIES}, or ('all',): every one "
           'present under data.root')
  if dc.name == 'synthetic':
    unknown = [c for c in dc.categories if c not in data_lib.SYNTHETIC_CATEGORIES]
    _check('data.categories', tuple(dc.categories), dc.categories and not unknown,
           f'some of {data_lib.SYNTHETIC_CATEGORIES}')
  _check('data.num_workers', dc.num_workers, dc.num_workers >= 1, 'at least 1')
  _check('backbone.name', bb.name, bb.name in backbones.NAMES, f'one of {backbones.NAMES}')
  _, strides = backbones.build_model(bb.name, backbones.DEFAULT_STAGES[bb.name])
  stages = tuple(bb.stages)
  _check('backbone.stages', stages, all(s in strides for s in stages),
         f'stages of {bb.name}: {tuple(strides)} (empty: its default '
         f'{backbones.DEFAULT_STAGES[bb.name]})')
  _check('backbone.official_bn_probe_passes', bb.official_bn_probe_passes,
         bb.official_bn_probe_passes >= 0, '>= 0')
  _check('calibration.holdout', cal.holdout, 0.0 <= cal.holdout < 1.0, 'in [0, 1)')
  _check('calibration.target_fpr', cal.target_fpr, 0.0 < cal.target_fpr < 1.0, 'in (0, 1)')
  _check('output.num_overlays', out.num_overlays, out.num_overlays >= 0, '>= 0')
  if bb.checkpoint and not os.path.isfile(bb.checkpoint):
    raise errors.UserError(f'config.backbone.checkpoint={bb.checkpoint!r}: no such file')
  _check('devices', config.devices, config.devices >= 0, '>= 0 (0: every device)')
  local = jax.local_devices()
  if config.devices > len(local):
    raise errors.UserError(f'config.devices={config.devices} is not allowed: this process has '
                           f'{len(local)} device(s): {local}')
  devices = config.devices or len(local)
  if dc.batch_size % devices:
    raise errors.UserError(f'config.data.batch_size={dc.batch_size} is not allowed: must be a '
                           f'multiple of the {devices} devices (config.devices)')
  cc = config.coreset
  _check('coreset.memory_budget_gb', cc.memory_budget_gb, cc.memory_budget_gb >= 0, '>= 0')
  if cc.spill_dir and not (os.path.isdir(cc.spill_dir) and os.access(cc.spill_dir, os.W_OK)):
    raise errors.UserError(f'config.coreset.spill_dir={cc.spill_dir!r}: not a writable folder')
  return settings_from_config(config)


def load_backbone(config):
  """The backbone a config describes, probed and folded as it says."""
  bb = config.backbone
  stages = tuple(bb.stages) or None
  seed = bb.random_seed if bb.random_seed >= 0 else None
  try:
    backbone = backbones.load_backbone(bb.name, stages=stages, checkpoint=bb.checkpoint,
                                       cache_dir=bb.cache_dir, random_seed=seed)
  except FileNotFoundError as error:  # Weights that are not here: the message says how to get them.
    raise errors.UserError(str(error)) from error
  backbone = backbones.official_bn_probe(backbone, image_size=config.data.image_size,
                                         passes=bb.official_bn_probe_passes)
  return backbones.fold_batchnorm(backbone) if bb.fold_batchnorm else backbone


def _overlay_indices(split, count):
  """Up to `count` test images: mostly anomalous ones, spread over defect types, plus good ones."""
  bad = [i for i, s in enumerate(split.test) if s.label == 1]
  good = [i for i, s in enumerate(split.test) if s.label == 0]
  n_good = min(len(good), max(1, count // 4))
  pick = lambda xs, n: [xs[int(j)] for j in np.linspace(0, len(xs) - 1, n)] if n and xs else []
  return sorted(set(pick(bad, min(len(bad), count - n_good)) + pick(good, n_good)))


def calibrate_on_test(model, labels, image_scores, masks=None, maps=None):
  """Adds the F1-optimal image (and pixel) thresholds of labelled test data to the calibration.

  The decision threshold stays the held-out one when the fit had a holdout; otherwise it becomes
  the F1-optimal one (source 'test_f1'). The pixel threshold becomes the F1-optimal pixel one.
  Returns:
    (model, record of the test thresholds for results.json).
  """
  threshold, f1 = metrics.f1_optimal_threshold(labels, image_scores)
  test = {}
  if threshold is not None:
    test.update(f1_image_threshold=threshold, image_f1=f1,
                misclassified=int(np.sum((np.asarray(image_scores) > threshold) != labels)))
  if masks is not None:
    pixel_threshold, pixel_f1 = metrics.f1_optimal_threshold(masks, maps)
    if pixel_threshold is not None:
      test.update(f1_pixel_threshold=pixel_threshold, pixel_f1=pixel_f1)
  cal = model.calibration
  changes = dict(test=tuple(sorted(test.items())))
  if cal.image_threshold is None and 'f1_image_threshold' in test:
    changes.update(image_threshold=test['f1_image_threshold'], image_threshold_source='test_f1',
                   pixel_threshold=test['f1_image_threshold'], pixel_threshold_source='test_f1')
  if 'f1_pixel_threshold' in test:
    changes.update(pixel_threshold=test['f1_pixel_threshold'], pixel_threshold_source='test_f1')
  return model.replace(calibration=dataclasses.replace(cal, **changes)), test


def make_mesh(config):
  """The mesh of this process's devices `config.devices` asks for, or None for one device."""
  devices = config.devices or len(jax.local_devices())
  return None if devices == 1 else sharded.row_mesh(devices, devices=jax.local_devices())


def run_category(config, backbone, split, workdir, key, no_mask=(), settings=None, mesh=None):
  """Fits PatchCore on `split.train`, evaluates on `split.test`; returns the results record.

  `no_mask`: defective test samples without a mask (from `data.check_split`), left out of the
  pixel metrics and named in the record. `settings`: from `validate_config` (derived if None).
  `mesh`: the devices to split the work over (`make_mesh`; None: one device).
  """
  dc = config.data
  settings = settings or settings_from_config(config)
  train = split.train[:dc.max_train_images] if dc.max_train_images > 0 else split.train
  logging.info('[%s] %d training, %d test images (%d anomalous)', split.name, len(train),
               len(split.test), sum(s.label for s in split.test))

  category_start = time.perf_counter()
  compile_before = patchcore.compile_seconds_total[0]
  patchcore.precompile(backbone, settings, mesh=mesh)  # Once per process and shape.
  model = patchcore.fit(backbone, train, key=key,
                        holdout=config.calibration.holdout,
                        target_fpr=config.calibration.target_fpr, num_workers=dc.num_workers,
                        progress=config.output.progress,
                        memory_budget_bytes=int(config.coreset.memory_budget_gb * 2**30),
                        spill_dir=config.coreset.spill_dir or None, mesh=mesh,
                        **dataclasses.asdict(settings))
  info = dict(model.info)
  patchcore.precompile(backbone, settings, model.bank, mesh)

  n_test = len(split.test)
  first, last = multihost.share(n_test)  # This process's test images (all with one process).
  n_mine = last - first
  image_scores = np.empty((n_mine,), np.float32)
  maps = np.empty((n_mine, dc.image_size, dc.image_size), np.float32)
  masks = np.empty((n_mine, dc.image_size, dc.image_size), bool)
  done = 0

  def batches():
    for images, batch_masks, count in data_lib.iterate_batches(
        split.test[first:last], batch_size=dc.batch_size, image_config=settings.image_config,
        with_masks=True, num_workers=dc.num_workers):
      masks[done:done + count] = batch_masks[:count]
      yield images, count

  inference_seconds = 0.0
  test_start = time.perf_counter()
  test_timings = {}
  for scores, batch_maps, _, seconds in patchcore.predict_batches(
      model, batches(), timings=test_timings, mesh=mesh):
    count = len(scores)
    image_scores[done:done + count] = scores
    maps[done:done + count] = batch_maps
    inference_seconds += seconds
    done += count
    logging.log_every_n_seconds(logging.INFO, '[%s] scored %d/%d test images', 10, split.name,
                                done, n_mine)

  test_seconds = time.perf_counter() - test_start
  if jax.process_count() > 1:  # Every process's share, in order, on every process.
    image_scores = multihost.allgather_rows(image_scores)
    maps = multihost.allgather_rows(maps)
    masks = multihost.allgather_rows(masks)
    inference_seconds = float(np.sum(multihost.allgather_rows(np.array([inference_seconds]))))
  metrics_start = time.perf_counter()
  labels = np.array([s.label for s in split.test])
  has_masks = split.has_masks
  pixel_masks, pixel_maps = masks, maps
  if has_masks and no_mask:  # Pixel metrics only where the truth is known.
    keep = np.array([s not in set(no_mask) for s in split.test])
    pixel_masks, pixel_maps = masks[keep], maps[keep]
  model, test_thresholds = calibrate_on_test(model, labels, image_scores,
                                             pixel_masks if has_masks else None, pixel_maps)
  cal = model.calibration
  result = {
      'image_auroc': metrics.image_auroc(labels, image_scores),
      'pixel_auroc': metrics.pixel_auroc(pixel_masks, pixel_maps) if has_masks else None,
      'au_pro': metrics.au_pro(pixel_masks, pixel_maps) if has_masks else None,
      'memory_bank_size': model.memory_bank_size,
      'fit_seconds': info['fit_seconds'],
      'inference_seconds_per_image': inference_seconds / n_test,
      'feature_seconds': info['feature_seconds'],
      'coreset_seconds': info['coreset_seconds'],
      'compile_seconds': patchcore.compile_seconds_total[0] - compile_before,
      'num_train_images': info['num_train_images'],
      'num_holdout_images': info['num_holdout_images'],
      'num_test_images': n_test,
      'devices': 1 if mesh is None else mesh.size,  # Per process.
      'processes': jax.process_count(),
      'num_excluded_from_pixel_metrics': len(no_mask) if has_masks else 0,
      'excluded_from_pixel_metrics': [split.relative(s.path) for s in no_mask]
                                     if has_masks else [],
      'image_threshold': cal.image_threshold,
      'image_threshold_source': cal.image_threshold_source,
      'pixel_threshold': cal.pixel_threshold,
      **test_thresholds,
  }
  metrics_seconds = time.perf_counter() - metrics_start
  if cal.image_threshold is not None:
    decided = image_scores > cal.image_threshold
    good, bad = labels == 0, labels == 1
    result['test_fpr_at_threshold'] = float(decided[good].mean()) if good.any() else None
    result['test_tpr_at_threshold'] = float(decided[bad].mean()) if bad.any() else None
  writing_start = time.perf_counter()
  if jax.process_index() != 0:  # Process 0 writes every output.
    return result
  _write_scores(os.path.join(workdir, 'scores', f'{split.name}.csv'), split, labels, image_scores)
  write_overlays(os.path.join(workdir, 'maps', split.name), split, model.calibration,
                 model.settings.image_config, image_scores, maps, masks,
                 config.output.num_overlays)
  if config.output.save_model:
    result['model_dir'] = saving.save(model, os.path.join(workdir, 'models', split.name))
  end = time.perf_counter()
  compile_seconds = result['compile_seconds']
  # Where the category's wall clock went. Decoding runs in worker threads (on the CPU backend
  # between compute batches, see data.common.default_prefetch); *_decode_wait is the time the
  # main thread waited for it.
  result['timings'] = {
      'wall': end - category_start,
      'compile': compile_seconds,
      'fit_decode_wait': info['decode_wait_seconds'],
      'fit_features': info['feature_seconds'] - info['decode_wait_seconds'],
      'coreset': info['coreset_seconds'],
      'test_decode_wait': test_timings.get('decode_wait', 0.0),
      'test_features': test_timings.get('features', 0.0),
      'test_knn_maps': test_timings.get('knn_maps', 0.0),
      'test_other': test_seconds - sum(test_timings.values()),
      'metrics': metrics_seconds,
      'writing': end - writing_start,
  }
  result['timings']['other'] = result['timings']['wall'] - sum(
      v for k, v in result['timings'].items() if k != 'wall')
  return result


def _write_scores(path, split, labels, scores):
  out = io.StringIO()
  writer = csv.writer(out)
  writer.writerow(['path', 'label', 'score'])
  for sample, label, score in zip(split.test, labels, scores):
    writer.writerow([split.relative(sample.path), int(label), repr(float(score))])
  workdir_lib.write_text(path, out.getvalue())


def write_overlays(directory, split, calibration, image_config, image_scores, maps, masks, count):
  """Labelled overlays of up to `count` test images of `split` (`_overlay_indices`), coloured on
  the calibration's fixed scale; images decoded again at `image_config`."""
  color_range = calibration.color_range
  if count <= 0:
    return
  if color_range is None:  # Only without any threshold (no holdout and no labelled test data).
    logging.warning('[%s] no threshold, so no fixed colour scale: overlays not written',
                    split.name)
    return
  os.makedirs(directory, exist_ok=True)
  for i in _overlay_indices(split, count):
    sample = split.test[i]
    image = data_lib.load_image(data_lib.open_file(sample, sample.path), **image_config)
    stem = os.path.splitext(os.path.basename(sample.path))[0]
    lines, ticks = visualize.caption(split.relative(sample.path), image_scores[i], calibration)
    workdir_lib.save_png(
        os.path.join(directory, f'{sample.defect}_{stem}.png'),
        visualize.labelled_overlay(image, maps[i], masks[i], vmin=color_range[0],
                                   vmax=color_range[1], lines=lines, ticks=ticks))


def _fmt(value, pct=True):
  if value is None:
    return 'n/a'
  return f'{100 * value:.2f}' if pct else f'{value:.1f}'


def results_table(results):
  """Markdown table of a results dict (metrics in percent)."""
  lines = ['| category | image AUROC | pixel AUROC | AU-PRO | misclassified | memory bank | fit s | '
           'ms / image |', '|---|---|---|---|---|---|---|---|']
  for name, r in results.items():
    lines.append(f'| {name} | {_fmt(r["image_auroc"])} | {_fmt(r["pixel_auroc"])} | '
                 f'{_fmt(r["au_pro"])} | {r.get("misclassified", "n/a")} | '
                 f'{r["memory_bank_size"]:,} | {r["fit_seconds"]:.1f} | '
                 f'{1000 * r["inference_seconds_per_image"]:.1f} |')
  return '\n'.join(lines)


def _run_secondary(config, workdir):
  """Process p > 0 of a multi-process job: the same work, no outputs (process 0 writes them);
  its logs name its share. Returns the results as process 0 computed them."""
  del workdir
  settings = validate_config(config)
  multihost_utils.sync_global_devices('data ready')  # Process 0 has built any TFDS dataset.
  splits = data_lib.get_splits(config.data)
  backbone = load_backbone(config)
  mesh = make_mesh(config)
  results = {}
  for i, (name, split) in enumerate(splits.items()):
    key = jax.random.fold_in(jax.random.key(config.seed), i)
    results[name] = run_category(config, backbone, split, None, key, data_lib.check_split(split),
                                 settings, mesh)
  return results


def run(config, workdir):
  """Runs PatchCore as `config` says on every category; writes outputs into `workdir`.

  The same call the launcher makes. For the synthetic data an empty `data.root` means
  `<workdir>/data` (the data is generated there once).
  Returns:
    {category: result record} (also in workdir/results.json).
  Raises:
    errors.UserError for a bad config value, path or file, before any work.
  """
  if config.data.name == 'synthetic' and not config.data.root:
    with config.unlocked():
      config.data.root = os.path.join(workdir, 'data')
  multihost.initialize(config.distributed)  # Before any device is used.
  if jax.process_index() != 0:
    return _run_secondary(config, workdir)
  settings = validate_config(config)
  data_info = {}
  try:
    splits = data_lib.get_splits(config.data, data_info)
  finally:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('data ready')  # The other processes read it now.
  no_masks = {}
  for name, split in splits.items():
    no_masks[name] = data_lib.check_split(split)
    for sample in no_masks[name]:
      logging.warning('[%s] %s is defective but has no mask: left out of the pixel metrics', name,
                      sample.path)
  status = workdir_lib.claim(workdir, job='patchcore', outputs=OUTPUTS,
                             overwrite=config.output.overwrite)
  try:
    workdir_lib.write_text(os.path.join(workdir, 'config.json'),
                           config.to_json_best_effort(indent=2))
    backbone = load_backbone(config)
    mesh = make_mesh(config)
    logging.info('backbone %s, stages %s (strides %s)', backbone.name, backbone.stages,
                 [backbone.strides.get(s) for s in backbone.stages])
    start = time.perf_counter()
    results = {}
    for i, (name, split) in enumerate(splits.items()):
      key = jax.random.fold_in(jax.random.key(config.seed), i)
      results[name] = run_category(config, backbone, split, workdir, key, no_masks[name],
                                   settings, mesh)
      results[name]['status'] = 'complete'
      if name in data_info:  # TFDS: the dataset read and what building it cost.
        results[name]['data'] = data_info[name]
      workdir_lib.write_json(os.path.join(workdir, 'results.json'), results)
      workdir_lib.mark_done(workdir, status, name)
    table = results_table(results)
    workdir_lib.write_text(os.path.join(workdir, 'results.md'), table + '\n')
  except BaseException as error:
    workdir_lib.finish(workdir, status, error=error)
    raise
  workdir_lib.finish(workdir, status)
  logging.info('results (%s, %s, coreset %.0f %%) in %.1f s:\n%s', config.data.name,
               backbone.name, 100 * config.coreset.percentage, time.perf_counter() - start, table)
  return results
