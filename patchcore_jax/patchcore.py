"""PatchCore's two verbs: `fit` a model on good images, `predict` scores, decisions and maps.

  backbone = backbones.load_backbone('efficientnet_lite2')
  model = fit(backbone, train_paths, Settings(percentage=0.1), holdout=0.1)
  prediction = predict(model, test_paths)  # scores, normalised scores, decisions, maps

`images` everywhere is a list of image files (decoded and resized on the host, as the official
code does), a uint8 array [N, H, W, 3] of any size (the same resize and crop), or a float array
[N, S, S, 3] in [0, 1] already at the network's input size S (`data.image_batches`).

Underneath: `memory_bank` (build the bank of training patch features, subsample it to a
coreset), `stages` (the compiled embedding and scoring, compiled once per process through a
`stages.StageCache`) and `model` (the records).

Many devices. `fit`, `predict` and `predict_batches` take a `mesh` (`sharded.row_mesh`): image
batches are split over its devices (data parallel), the coreset runs with the projection's
columns split over them (`sharded.greedy_coreset_loop`, the same picks), and test patches are
searched in the bank split by rows (`sharded.shard_bank`, `sharded.nearest_neighbours`: the same
neighbours; the distances are the exact scan's, which the one-device screened search matches to
float32 rounding). The batch size must be a multiple of the mesh's size. Several processes
(`multihost`): each embeds its share of the training images and the coreset spans them all.
"""
import datetime
import time
from typing import NamedTuple

from absl import logging
import jax
import numpy as np

from patchcore_jax import errors
from patchcore_jax import knn
from patchcore_jax import memory_bank
from patchcore_jax import multihost
from patchcore_jax import stages
from patchcore_jax import timing
from patchcore_jax.data import common as data_common
from patchcore_jax.model import decide
from patchcore_jax.model import holdout_calibration
from patchcore_jax.model import PatchCore
from patchcore_jax.model import Prediction
from patchcore_jax.model import Settings
from patchcore_jax.model import split_holdout


class BatchScores(NamedTuple):
  """What `predict_batch` returns for one batch: numpy arrays over its `count` real images.

  image_scores: [count] float32; maps: [count, S, S] float32; patch_scores: [count, h, w];
  seconds: the compute time, waited for.
  """
  image_scores: np.ndarray
  maps: np.ndarray
  patch_scores: np.ndarray
  seconds: float


def _images(settings, images, num_workers):
  return data_common.image_batches(images, batch_size=settings.batch_size,
                                   image_config=settings.image_config, num_workers=num_workers)


def _pick(images, indices):
  return images[indices] if hasattr(images, 'shape') else [images[i] for i in indices]


def _coreset(bank_features, settings, *, key, progress, mesh):
  """The prepared coreset bank of `bank_features` (this process's rows, with several)."""
  if jax.process_count() == 1:
    bank, _ = memory_bank.subsample(
        bank_features, percentage=settings.percentage, key=key,
        projection_dim=settings.projection_dim, num_starts=settings.num_starts,
        block_size=settings.block_size, precision=settings.precision, screen=settings.screen,
        progress=progress, mesh=mesh, method=settings.coreset_method)
    return bank
  indices = multihost.coreset_indices(
      bank_features, total_rows=int(multihost.row_counts(bank_features.shape[0]).sum()),
      percentage=settings.percentage, key=key, projection_dim=settings.projection_dim,
      num_starts=settings.num_starts, precision=settings.precision)
  return knn.prepare_bank(multihost.gather_selected(bank_features, indices),
                          block_size=settings.block_size, screen=settings.screen)


def fit(backbone, images, settings=None, *, holdout=0.0, target_fpr=0.01, key=None,
        num_workers=0, progress=True, memory_budget_bytes=None, spill_dir=None, mesh=None,
        cache=stages.DEFAULT_CACHE):
  """Fits PatchCore on good images.

  Args:
    backbone: a `backbones.Backbone` (prepared as it should score: probe passes and BatchNorm
      folding are recorded from it).
    images: paths (or `data.Sample` records), or a uint8 [N, H, W, 3] / float [N, S, S, 3]
      array (see module docstring).
    settings: every hyperparameter (`Settings`; default: the paper's).
    holdout: fraction of `images` held out of the memory bank to calibrate the threshold on
      (0: no threshold from the fit).
    target_fpr: the held-out images' false-positive rate the threshold aims for.
    key: PRNG key for the coreset (default: jax.random.key(settings.seed)).
    num_workers: image-decoding threads (0: what the machine suits, `data.decode_workers`).
    progress: show progress bars (tqdm.auto: in notebooks and terminals).
    memory_budget_bytes: a memory bank larger than this streams to a file
      (`memory_bank.DiskBank`) in `spill_dir` (default: the system's temporary directory);
      None: always in memory.
    mesh: a `jax.sharding.Mesh` (`sharded.row_mesh`) to split the work over (module docstring);
      None: one device.
    cache: the `stages.StageCache` to compile through.
  Returns:
    A `PatchCore`.
  """
  settings = Settings() if settings is None else settings
  if not isinstance(settings, Settings):
    raise TypeError(f'settings must be a Settings, got {type(settings).__name__}')
  settings.validate()
  if not 0.0 < target_fpr < 1.0:
    raise errors.UserError(f'target_fpr={target_fpr} is not allowed: must be in (0, 1)')
  train_idx, holdout_idx = split_holdout(len(images), holdout=holdout, seed=settings.seed)
  train, held = _pick(images, train_idx), _pick(images, holdout_idx)
  key = jax.random.key(settings.seed) if key is None else key
  memory_bank.check_bank_size(settings, num_images=len(train),
                              grid=stages.feature_grid(backbone, settings))
  stages.check_mesh_batch(settings.batch_size, mesh)

  start, stop = multihost.share(len(train))  # This process's images (all with one process).
  mine = train[start:stop]
  t0 = time.perf_counter()
  bar = timing.progress_bar(len(mine), 'memory bank', progress)
  update = (lambda done: bar.update(done - bar.n)) if bar is not None else None
  waits = {}
  bank_features = memory_bank.build_memory_bank(
      lambda x: stages.embed_batch(backbone, x, settings, mesh, cache=cache),
      data_common.to_device(_images(settings, mine, num_workers), ahead=0 if mesh else None),
      num_images=len(mine), progress=update,
      timings=waits, memory_budget_bytes=memory_budget_bytes, spill_dir=spill_dir)
  if bar is not None:
    bar.close()
  feature_seconds = time.perf_counter() - t0
  t1 = time.perf_counter()
  rows = int(multihost.row_counts(bank_features.shape[0]).sum())
  bank = _coreset(bank_features, settings, key=key, progress=progress, mesh=mesh)
  jax.block_until_ready(bank)
  coreset_seconds = time.perf_counter() - t1
  on_disk = isinstance(bank_features, memory_bank.DiskBank)
  if on_disk:
    bank_features.close()
  del bank_features
  info = dict(num_train_images=len(train), num_holdout_images=len(held), memory_bank_rows=rows,
              num_processes=jax.process_count(),
              memory_bank_storage='disk' if on_disk else 'memory',
              feature_seconds=feature_seconds, coreset_seconds=coreset_seconds,
              decode_wait_seconds=waits.get('decode_wait', 0.0),
              fit_seconds=feature_seconds + coreset_seconds,
              created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'))
  model = PatchCore(backbone=backbone, bank=bank, settings=settings,
                    info=tuple(sorted(info.items())))
  logging.info('memory bank %d -> %d patches (%.1f %%); features %.1f s, coreset %.1f s', rows,
               bank.size, 100 * settings.percentage, feature_seconds, coreset_seconds)
  if len(held):
    scores = predict(model, held, num_workers=num_workers, progress=progress, mesh=mesh,
                     cache=cache).image_scores
    calibration = holdout_calibration(scores, target_fpr=target_fpr)
    above = int(np.sum(scores > calibration.image_threshold))
    logging.info('threshold %.6g from %d held-out good images (target FPR %.3g; %d of them above '
                 'it, FPR %.3g; with %d images the FPR moves in steps of %.3g)',
                 calibration.image_threshold, len(scores), target_fpr, above,
                 above / len(scores), len(scores), 1 / len(scores))
    model = model.replace(calibration=calibration)
  return model


def predict_batch(model, batch, *, timings=None, mesh=None, cache=stages.DEFAULT_CACHE):
  """Scores one `data.Batch` -> `BatchScores` of its `count` real images.

  `mesh`: split the batch over its devices and search the bank split by rows over them (module
  docstring). `timings`: optional dict accumulating seconds: 'features' (backbone and patch
  features) and 'knn_maps' (search, scores and maps); the two stages are then waited for
  separately.
  """
  start = time.perf_counter()
  feats = stages.embed_batch(model.backbone, batch.images, model.settings, mesh, cache=cache)
  if timings is not None:
    jax.block_until_ready(feats)
    middle = time.perf_counter()
    timings['features'] = timings.get('features', 0.0) + middle - start
  scores, maps, grid = stages.score_batch(model.bank, feats, model.settings, mesh, cache=cache)
  scores, maps, grid = np.asarray(scores), np.asarray(maps), np.asarray(grid)  # Waits.
  end = time.perf_counter()
  if timings is not None:
    timings['knn_maps'] = timings.get('knn_maps', 0.0) + end - middle
  count = batch.count
  return BatchScores(scores[:count], maps[:count], grid[:count], end - start)


def predict_batches(model, batches, *, timings=None, mesh=None, cache=stages.DEFAULT_CACHE):
  """Yields `predict_batch` of every `data.Batch` in `batches`; `timings` also accumulates
  'decode_wait' (the seconds spent waiting for `batches`). On an accelerator (without a `mesh`)
  the next batches' copies to the device are issued before a batch is scored
  (`data.to_device`), so `batches` is read ahead."""
  batches = data_common.to_device(batches, ahead=0 if mesh else None)
  for batch in timing.timed_iter(batches, timings, 'decode_wait'):
    yield predict_batch(model, batch, timings=timings, mesh=mesh, cache=cache)


def predict(model, images, *, num_workers=0, progress=False, mesh=None,
            cache=stages.DEFAULT_CACHE):
  """Scores `images` (paths or arrays, see module docstring) -> `Prediction`; `mesh` as in
  `predict_batch`."""
  parts = ([], [], [])
  bar = timing.progress_bar(len(images), 'predict', progress)
  for out in predict_batches(model, _images(model.settings, images, num_workers), mesh=mesh,
                             cache=cache):
    for part, value in zip(parts, out[:3]):
      part.append(value)
    if bar is not None:
      bar.update(len(out.image_scores))
  if bar is not None:
    bar.close()
  if not parts[0]:
    raise ValueError('predict() got no images')
  scores, maps, grid = (np.concatenate(p) for p in parts)
  normalized, anomalous = decide(model.calibration, scores)
  return Prediction(scores, normalized, anomalous, maps, grid)
