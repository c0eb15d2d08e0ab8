"""run(config, workdir): PatchCore on every category of a dataset, from images to metrics.

Each category is `patchcore.fit` on its training images and `patchcore.predict_batches` on its
test images, then evaluated (`evaluation`); the fitted model, calibrated with the F1-optimal
thresholds of the labelled test data (and the held-out good images when `calibration.holdout`
> 0), is saved.

Before any work the whole config is read and checked (`config.read_experiment`), every image
and mask file is checked from its header (`data.check_split`), and the workdir is claimed
(`workdir.running`: a workdir holding another run's outputs is refused unless
`output.overwrite`; SIGTERM/SIGINT leave the status 'interrupted', exit 143/130).

Writes into `workdir` (every file atomically):
  status.json                  'running' until the end, then 'complete', 'interrupted' (+ the
                               signal) or 'failed' (+ error);
                               the categories done so far
  config.json                  the full config
  results.json                 {category: {image_auroc, pixel_auroc, au_pro, memory_bank_size,
                                fit_seconds, inference_seconds_per_image, thresholds, ...}}
  results.md                   the same as a table
  scores/<category>.csv        path,label,score per test image
  maps/<category>/*.png        labelled overlays for some test images: input | map | blend
  models/<category>/           the fitted model (`saving.load`), with output.save_model
"""
import os
import time

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from patchcore_jax import data as data_lib
from patchcore_jax import evaluation
from patchcore_jax import files
from patchcore_jax import memory_bank
from patchcore_jax import multihost
from patchcore_jax import patchcore
from patchcore_jax import saving
from patchcore_jax import stages
from patchcore_jax.jobs import config as config_lib
from patchcore_jax.jobs import workdir as workdir_lib

# What a run writes into its workdir (what a second run must not mix with).
OUTPUTS = ('config.json', 'results.json', 'results.md', 'scores', 'maps', 'models')


def run_category(experiment, backbone, split, workdir, key, no_mask=(), mesh=None):
  """Fits PatchCore on `split.train`, evaluates on `split.test`; returns the results record.

  `experiment`: a `config.Experiment`. `no_mask`: defective test samples without a mask (from
  `data.check_split`), left out of the pixel metrics and named in the record. `mesh`: the
  devices to split the work over (None: one device). `workdir` None: write nothing.
  """
  settings, options = experiment.settings, experiment.options
  train = split.train[:options.max_train_images] if options.max_train_images > 0 else split.train
  logging.info('[%s] %d training, %d test images (%d anomalous)', split.name, len(train),
               len(split.test), sum(s.label for s in split.test))
  memory_bank.check_bank_size(settings, num_images=len(train),
                              grid=stages.feature_grid(backbone, settings),
                              names=config_lib.SETTING_NAMES)

  category_start = time.perf_counter()
  compile_before = stages.DEFAULT_CACHE.compile_seconds
  stages.precompile(backbone, settings, mesh=mesh)  # Once per process and shape.
  model = patchcore.fit(backbone, train, settings, key=key, holdout=options.holdout,
                        target_fpr=options.target_fpr, num_workers=options.num_workers,
                        progress=options.progress,
                        memory_budget_bytes=options.memory_budget_bytes,
                        spill_dir=options.spill_dir, mesh=mesh)
  info = dict(model.info)
  stages.precompile(backbone, settings, model.bank, mesh)

  n_test = len(split.test)
  first, last = multihost.share(n_test)  # This process's test images (all with one process).
  n_mine = last - first
  size = settings.image_size
  image_scores = np.empty((n_mine,), np.float32)
  maps = np.empty((n_mine, size, size), np.float32)
  masks = np.empty((n_mine, size, size), bool)
  done = 0

  def batches():  # Read ahead of the scoring on accelerators (predict_batches): its own count.
    read = 0
    for batch in data_lib.iterate_batches(
        split.test[first:last], batch_size=settings.batch_size,
        image_config=settings.image_config, with_masks=True, num_workers=options.num_workers):
      masks[read:read + batch.count] = batch.masks[:batch.count]
      read += batch.count
      yield batch

  inference_seconds = 0.0
  test_start = time.perf_counter()
  test_timings = {}
  for out in patchcore.predict_batches(model, batches(), timings=test_timings, mesh=mesh):
    count = len(out.image_scores)
    image_scores[done:done + count] = out.image_scores
    maps[done:done + count] = out.maps
    inference_seconds += out.seconds
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
  if not has_masks:
    pixel_masks = pixel_maps = None
  test_thresholds = evaluation.test_thresholds(labels, image_scores, pixel_masks, pixel_maps)
  model = model.replace(calibration=evaluation.calibrate_on_test(model.calibration,
                                                                 test_thresholds))
  cal = model.calibration
  result = {
      **evaluation.metric_record(
          labels, image_scores, pixel_masks, pixel_maps,
          transform=evaluation.describe_transform(settings.image_config)),
      'memory_bank_size': model.memory_bank_size,
      'fit_seconds': info['fit_seconds'],
      'inference_seconds_per_image': inference_seconds / n_test,
      'feature_seconds': info['feature_seconds'],
      'coreset_seconds': info['coreset_seconds'],
      'compile_seconds': stages.DEFAULT_CACHE.compile_seconds - compile_before,
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
  for metric, why in result.get('metric_notes', {}).items():
    logging.warning('[%s] %s is n/a: %s', split.name, metric, why)
  if cal.image_threshold is not None:
    decided = image_scores > cal.image_threshold
    good, bad = labels == 0, labels == 1
    result['test_fpr_at_threshold'] = float(decided[good].mean()) if good.any() else None
    result['test_tpr_at_threshold'] = float(decided[bad].mean()) if bad.any() else None
  writing_start = time.perf_counter()
  if workdir is None:  # Process p > 0: process 0 writes every output.
    return result
  evaluation.write_scores_csv(os.path.join(workdir, 'scores', f'{split.name}.csv'), split,
                              labels, [('score', image_scores)])
  evaluation.write_overlays(os.path.join(workdir, 'maps', split.name), split, model.calibration,
                            settings.image_config, image_scores, maps, masks,
                            options.num_overlays)
  if options.save_model:
    result['model_dir'] = saving.save(model, os.path.join(workdir, 'models', split.name))
  end = time.perf_counter()
  # Where the category's wall clock went. Decoding runs in worker threads (on the CPU backend
  # between compute batches, see data.common.default_prefetch); *_decode_wait is the time the
  # main thread waited for it.
  result['timings'] = {
      'wall': end - category_start,
      'compile': result['compile_seconds'],
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
  notes = [f'- {name}, {metric}: {why}' for name, r in results.items()
           for metric, why in r.get('metric_notes', {}).items()]
  if notes:
    lines += ['', 'n/a:', *notes]
  return '\n'.join(lines)


def _categories(experiment, splits, no_masks, backbone, workdir, mesh, data_info=None,
                run_status=None):
  """run_category on every split; with a `workdir`, results.json after each category."""
  results = {}
  for i, (name, split) in enumerate(splits.items()):
    key = jax.random.fold_in(jax.random.key(experiment.options.seed), i)
    results[name] = run_category(experiment, backbone, split, workdir, key, no_masks[name], mesh)
    if workdir is None:
      continue
    results[name]['status'] = 'complete'
    if name in (data_info or {}):  # TFDS: the dataset read and what building it cost.
      results[name]['data'] = data_info[name]
    files.write_json(os.path.join(workdir, 'results.json'), results)
    run_status.mark_done(name)
  return results


def _run_secondary(config, workdir):
  """Process p > 0 of a multi-process job: the same work, no outputs (process 0 writes them);
  its logs name its share. Returns the results as process 0 computed them."""
  experiment = config_lib.read_experiment(config, workdir)  # Generated data: <workdir>/data.
  multihost_utils.sync_global_devices('data ready')  # Process 0 has built any TFDS dataset.
  splits = data_lib.get_splits(experiment.data)
  backbone = config_lib.load_backbone(experiment.backbone,
                                      image_size=experiment.settings.image_size)
  no_masks = {name: data_lib.check_split(split) for name, split in splits.items()}
  return _categories(experiment, splits, no_masks, backbone, None,
                     config_lib.make_mesh(experiment.options.devices))


def run(config, workdir):
  """Runs PatchCore as `config` says on every category; writes outputs into `workdir`.

  The same call the launcher makes. For the synthetic data an empty `data.root` means
  `<workdir>/data` (the data is generated there once).
  Returns:
    {category: result record} (also in workdir/results.json).
  Raises:
    errors.UserError for a bad config value, path or file, before any work.
  """
  config_lib.join_processes(config)  # Before any device is used.
  if jax.process_index() != 0:
    return _run_secondary(config, workdir)
  experiment = config_lib.read_experiment(config, workdir)
  data_info = {}
  try:
    splits = data_lib.get_splits(experiment.data, data_info)
  finally:
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices('data ready')  # The other processes read it now.
  no_masks = {}
  for name, split in splits.items():
    no_masks[name] = data_lib.check_split(split)
    for sample in no_masks[name]:
      logging.warning('[%s] %s is defective but has no mask: left out of the pixel metrics', name,
                      sample.path)
  with workdir_lib.running(workdir, job='patchcore', outputs=OUTPUTS,
                          overwrite=experiment.options.overwrite) as run_status:
    files.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
    backbone = config_lib.load_backbone(experiment.backbone,
                                        image_size=experiment.settings.image_size)
    logging.info('backbone %s, stages %s (strides %s)', backbone.name, backbone.stages,
                 [backbone.strides.get(s) for s in backbone.stages])
    start = time.perf_counter()
    results = _categories(experiment, splits, no_masks, backbone, workdir,
                          config_lib.make_mesh(experiment.options.devices), data_info, run_status)
    table = results_table(results)
    files.write_text(os.path.join(workdir, 'results.md'), table + '\n')
  logging.info('results (%s, %s, coreset %.0f %%) in %.1f s:\n%s', experiment.data.name,
               backbone.name, 100 * experiment.settings.percentage, time.perf_counter() - start,
               table)
  return results
