"""PatchCore as a model you fit once and keep: `fit`, `predict`, calibration.

  backbone = backbones.fold_batchnorm(backbones.load_backbone('efficientnet_lite2'))
  model = patchcore.fit(backbone, train_paths, percentage=0.1, holdout=0.1)
  prediction = patchcore.predict(model, test_paths)  # scores, normalised scores, decisions, maps
  saving.save(model, 'models/bottle'); model = saving.load('models/bottle')

`images` everywhere is a list of image files (decoded and resized on the host, as the official
code does), a uint8 array [N, H, W, 3] of any size (the same resize and crop), or a float array
[N, S, S, 3] in [0, 1] already at the network's input size S.

The pieces underneath are plain functions a notebook can compose: `build_memory_bank` (patch
features of all training images into one host array), `subsample` (greedy coreset ->
`knn.Bank`), `embed_batch` and `score_batch` (the two compiled test-time stages). Every compiled
stage is built once per process for each backbone, setting and shape (`compiled`), so a fit and
the predictions after it, and every category of a multi-category run, share one backbone
compilation.

Many devices. `fit`, `predict` and `predict_batches` take a `mesh` (`sharded.row_mesh`): image
batches are split over its devices (data parallel), the coreset runs with the projection's
columns split over them (`sharded.greedy_coreset_loop`, the same picks), and test patches are
searched in the bank split by rows (`sharded.shard_bank`, `sharded.nearest_neighbours`: the same
neighbours; the distances are the exact scan's, which the one-device screened search matches to
float32 rounding). The batch size must be a multiple of the mesh's size.

Calibration. A threshold turns scores into decisions: an image is anomalous when its score is
above `image_threshold`. It comes from good images held out of the fit (`holdout`, the
inspection setting: with n held-out scores and `target_fpr`, the threshold is the (m+1)-th
largest score, m = floor(target_fpr * n), so at most m of them, a fraction <= target_fpr, lie
above it), or from labelled test data (the F1-optimal threshold; `experiment.run` adds it), or is
set by hand (`with_threshold`). Normalised scores are score / (2 * threshold): 0.5 at the
threshold, 0 for a perfect match, linear in between and above. Maps are coloured on the fixed
scale [0, 2 * threshold] (the normalised map's [0, 1]), never by a batch's own range.
"""
import collections
import dataclasses
import datetime
import functools
import os
import tempfile
import time
from typing import Any, NamedTuple, Optional, Tuple

from absl import logging
from flax import struct
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax import backbones as backbones_lib
from patchcore_jax import coreset
from patchcore_jax import errors
from patchcore_jax import features as features_lib
from patchcore_jax import knn
from patchcore_jax import multihost
from patchcore_jax import scoring
from patchcore_jax import sharded
from patchcore_jax.data import common as data_common
from patchcore_jax.data import transforms
from patchcore_jax.version import __version__


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every hyperparameter of a fitted model (the defaults are the paper's and official code's)."""
  # Preprocessing (data.transforms): shorter side to `resize`, centre crop `image_size`
  # ('resize_crop'), or straight to image_size squared ('resize').
  transform: str = 'resize_crop'
  resize: int = 256
  image_size: int = 224
  # Patch features (features.patch_features).
  patch_size: int = 3
  stride: int = 1
  pretrain_dim: int = 1024
  target_dim: int = 1024
  # Memory bank (coreset.approximate_greedy_coreset); seed makes the projection and starts.
  percentage: float = 0.1
  projection_dim: int = 128
  num_starts: int = 10
  seed: int = 0
  # Search and scoring (knn, scoring).
  k: int = 1
  block_size: int = 128
  precision: str = 'highest'
  screen: bool = True
  distance: str = 'squared_l2'
  sigma: float = 4.0
  reweight: bool = False
  reweight_neighbours: int = 9
  batch_size: int = 8  # Images per compiled call.

  @property
  def image_config(self):
    return dict(resize=self.resize, image_size=self.image_size, transform=self.transform)

  @property
  def feature_config(self):
    return dict(patch_size=self.patch_size, stride=self.stride, pretrain_dim=self.pretrain_dim,
                target_dim=self.target_dim)

  @property
  def score_config(self):
    return dict(image_size=self.image_size, k=self.k, distance=self.distance, sigma=self.sigma,
                reweight=self.reweight, reweight_neighbours=self.reweight_neighbours,
                precision=self.precision)

  def validate(self):
    """Raises errors.UserError naming the first field with a value out of range (and the config
    field it comes from)."""
    checks = [
        ('transform', self.transform in transforms.TRANSFORMS, f'one of {transforms.TRANSFORMS}'),
        ('image_size', self.image_size >= 16, 'at least 16'),
        ('resize', self.resize >= 1, 'positive'),
        ('patch_size', self.patch_size >= 1, 'positive'),
        ('stride', self.stride >= 1, 'positive'),
        ('pretrain_dim', self.pretrain_dim >= 1, 'positive'),
        ('target_dim', self.target_dim >= 1, 'positive'),
        ('percentage', 0.0 < self.percentage <= 1.0, 'in (0, 1]'),
        ('projection_dim', self.projection_dim >= 1, 'positive'),
        ('num_starts', self.num_starts >= 1, 'positive'),
        ('k', self.k >= 1, 'at least 1'),
        ('block_size', self.block_size >= 1, 'positive'),
        ('precision', self.precision in ('default', 'high', 'highest'),
         "one of ('default', 'high', 'highest')"),
        ('distance', self.distance in scoring.DISTANCES, f'one of {scoring.DISTANCES}'),
        ('sigma', self.sigma >= 0, 'non-negative'),
        ('reweight_neighbours', self.reweight_neighbours >= 1, 'at least 1'),
        ('batch_size', self.batch_size >= 1, 'at least 1'),
    ]
    for field, ok, allowed in checks:
      if not ok:
        raise errors.UserError(f'{field} ({CONFIG_FIELDS[field]}) = {getattr(self, field)!r} is '
                               f'not allowed: must be {allowed}')
    if self.transform == 'resize_crop' and self.image_size > self.resize:
      raise errors.UserError(
          f'image_size ({CONFIG_FIELDS["image_size"]}) = {self.image_size} is larger than resize '
          f'({CONFIG_FIELDS["resize"]}) = {self.resize}: the centre crop would pad the image with '
          'black borders; make resize >= image_size')
    return self


# The config field (configs/common.py) each setting comes from, for messages.
CONFIG_FIELDS = {
    'transform': 'data.transform', 'resize': 'data.resize', 'image_size': 'data.image_size',
    'patch_size': 'features.patch_size', 'stride': 'features.patch_stride',
    'pretrain_dim': 'features.pretrain_dim', 'target_dim': 'features.target_dim',
    'percentage': 'coreset.percentage', 'projection_dim': 'coreset.projection_dim',
    'num_starts': 'coreset.num_starts', 'seed': 'seed', 'k': 'knn.k',
    'block_size': 'knn.block_size', 'precision': 'knn.precision', 'screen': 'knn.screen',
    'distance': 'scoring.distance', 'sigma': 'scoring.sigma', 'reweight': 'scoring.reweight',
    'reweight_neighbours': 'scoring.reweight_neighbours', 'batch_size': 'data.batch_size',
}


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Thresholds and where they came from (see the module docstring).

  image_threshold: an image is anomalous when its score is above this (None: no decisions).
  image_threshold_source: 'holdout', 'test_f1', 'manual' or 'none'.
  pixel_threshold: a map pixel is defective above this (binary masks); the F1-optimal pixel
    threshold on labelled test data when there was one, else `image_threshold`.
  pixel_threshold_source: as image_threshold_source.
  holdout_scores: scores of the held-out good images, ascending.
  target_fpr: the false-positive rate the holdout threshold was chosen for.
  test: (name, value) pairs measured on labelled test data: f1_image_threshold, image_f1,
    misclassified (test images on the wrong side of f1_image_threshold), f1_pixel_threshold,
    pixel_f1.
  """
  image_threshold: Optional[float] = None
  image_threshold_source: str = 'none'
  pixel_threshold: Optional[float] = None
  pixel_threshold_source: str = 'none'
  holdout_scores: Tuple[float, ...] = ()
  target_fpr: Optional[float] = None
  test: Tuple[Tuple[str, Any], ...] = ()

  @property
  def color_range(self):
    """(vmin, vmax) of the map colours: [0, 2 * image_threshold], or None without a threshold."""
    if self.image_threshold is None:
      return None
    return 0.0, 2.0 * self.image_threshold

  def to_dict(self):
    out = dataclasses.asdict(self)
    out['holdout_scores'] = list(self.holdout_scores)
    out['test'] = dict(self.test)
    return out

  @classmethod
  def from_dict(cls, d):
    d = dict(d)
    d['holdout_scores'] = tuple(float(x) for x in d.get('holdout_scores', ()))
    d['test'] = tuple(sorted(dict(d.get('test', {})).items()))
    return cls(**d)


@struct.dataclass
class PatchCore:
  """A fitted PatchCore: everything needed to score images.

  A pytree whose leaves are the backbone's variables and the memory bank; the rest is static.
  backbone: the `backbones.Backbone` (its name, stages and weights_sha256 identify it).
  bank: the prepared memory bank (`knn.Bank`).
  settings: every hyperparameter (`Settings`).
  calibration: thresholds (`Calibration`).
  info: (name, value) pairs about the fit: num_train_images, memory_bank_rows (before the
    coreset), fit timings, created (UTC, ISO 8601).
  version: the library version that fitted it.
  """
  backbone: backbones_lib.Backbone
  bank: knn.Bank
  settings: Settings = struct.field(pytree_node=False)
  calibration: Calibration = struct.field(pytree_node=False, default=Calibration())
  info: Tuple[Tuple[str, Any], ...] = struct.field(pytree_node=False, default=())
  version: str = struct.field(pytree_node=False, default=__version__)

  @property
  def memory_bank_size(self):
    return self.bank.size


class Prediction(NamedTuple):
  """What `predict` returns, numpy arrays over N images.

  image_scores: [N] float32 raw scores (squared L2 by default; see Settings.distance).
  normalized_scores: [N] score / (2 * threshold), 0.5 at the threshold; None without one.
  anomalous: [N] bool, score > threshold; None without a threshold.
  maps: [N, S, S] float32 anomaly maps at the network's input size.
  patch_scores: [N, h, w] float32 patch scores.
  """
  image_scores: np.ndarray
  normalized_scores: Optional[np.ndarray]
  anomalous: Optional[np.ndarray]
  maps: np.ndarray
  patch_scores: np.ndarray


# Compiled stages, one per (stage, static settings, input shapes) in this process.
_COMPILED = collections.OrderedDict()
_MAX_COMPILED = 32
compile_seconds_total = [0.0]  # Seconds spent compiling in this process (read by experiment).


def clear_compiled():
  """Forgets every compiled stage (the next use compiles again, as in a fresh process)."""
  _COMPILED.clear()


def compiled(fn, static, *args):
  """`jax.jit(fn, static)` lowered and compiled for `args`' shapes, once per process.

  Args:
    fn: a function of (*args, **static).
    static: a hashable tuple of (name, value) keyword arguments.
    *args: arrays or jax.ShapeDtypeStructs (pytrees of them).
  Returns:
    The compiled executable; call it with arrays of the same shapes and dtypes.
  """
  leaves, treedef = jax.tree_util.tree_flatten(args)
  key = (fn, static, treedef, tuple((tuple(x.shape), str(x.dtype), _mesh_sharding(x))
                                    for x in leaves))
  if key in _COMPILED:
    _COMPILED.move_to_end(key)
    return _COMPILED[key]
  start = time.perf_counter()
  executable = jax.jit(functools.partial(fn, **dict(static))).lower(*args).compile()
  compile_seconds_total[0] += time.perf_counter() - start
  _COMPILED[key] = executable
  if len(_COMPILED) > _MAX_COMPILED:
    _COMPILED.popitem(last=False)
  return executable


def _mesh_sharding(x):
  """x's NamedSharding (a mesh-placed input compiles separately), else None."""
  sharding = getattr(x, 'sharding', None)
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def _embed(variables, images, *, model, stages, patch_size, stride, pretrain_dim, target_dim):
  return features_lib.embed(model.apply, variables, images, stages=stages, patch_size=patch_size,
                            stride=stride, pretrain_dim=pretrain_dim, target_dim=target_dim)


def _score(bank, feats, *, image_size, k, distance, sigma, reweight, reweight_neighbours,
           precision, mesh=None, with_index=False):
  """feats [B, h, w, D] -> (image scores [B], maps [B, S, S], patch scores [B, h, w]) and, with
  `with_index`, each patch's nearest bank row [B, h * w]. With a `mesh`, `bank` is split by rows
  over it (`sharded.shard_bank`) and searched there."""
  b, h, w, d = feats.shape
  queries = feats.reshape(b, h * w, d)
  if mesh is None:
    sq_dist, nn_index = knn.batch_nearest_neighbours(queries, bank, k=k, precision=precision)
  else:
    sq_dist, nn_index = sharded.nearest_neighbours(queries.reshape(b * h * w, d), bank,
                                                   mesh=mesh, k=k, precision=precision)
    sq_dist, nn_index = sq_dist.reshape(b, h * w, k), nn_index.reshape(b, h * w, k)
  scores = scoring.patch_scores(sq_dist, distance=distance)  # [B, h*w]
  if reweight:
    image_scores = scoring.reweighted_image_scores(
        queries, scores, nn_index[..., 0], bank, num_neighbours=reweight_neighbours,
        precision=precision)
  else:
    image_scores = scoring.image_scores(scores)
  grid = scores.reshape(b, h, w)
  maps = scoring.anomaly_maps(grid, size=(image_size, image_size), sigma=sigma)
  return (image_scores, maps, grid) + ((nn_index[..., 0],) if with_index else ())


def _static(**kwargs):
  return tuple(sorted(kwargs.items()))


# Backbone variables and banks placed on a mesh, per (tree, mesh, placement); the tree is kept
# referenced so that its id is not reused while the entry lives.
_ON_MESH = collections.OrderedDict()


def _replicate(tree, mesh):
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def _on_mesh(tree, mesh, place):
  """place(tree, mesh) (`_replicate`, `sharded.shard_bank`), once per tree and mesh."""
  key = (id(tree), mesh, place)
  if key not in _ON_MESH:
    _ON_MESH[key] = (tree, place(tree, mesh))
    if len(_ON_MESH) > 8:
      _ON_MESH.popitem(last=False)
  return _ON_MESH[key][1]


def _score_static(settings, mesh, with_index=False):
  extra = dict(mesh=mesh) if mesh is not None else {}
  extra.update(dict(with_index=True) if with_index else {})
  return _static(**settings.score_config, **extra)


def _check_mesh_batch(batch_size, mesh):
  if mesh is not None and batch_size % mesh.size:
    raise errors.UserError(f'batch_size ({CONFIG_FIELDS["batch_size"]}) = {batch_size} is not a '
                           f'multiple of the {mesh.size} devices it is split over')


def embed_batch(backbone, images, settings, mesh=None):
  """images [B, S, S, 3] float32 in [0, 1] -> patch features [B, h, w, D] (compiled once);
  with a `mesh`, the batch is split over its devices."""
  variables = backbone.variables
  if mesh is None:
    images = jnp.asarray(images, jnp.float32)
  else:
    _check_mesh_batch(images.shape[0], mesh)
    images = sharded.shard_batch(np.asarray(images, np.float32), mesh)
    variables = _on_mesh(variables, mesh, _replicate)
  fn = compiled(_embed, _static(model=backbone.model, stages=tuple(backbone.stages),
                                **settings.feature_config), variables, images)
  return fn(variables, images)


def precompile(backbone, settings, bank=None, mesh=None):
  """Compiles the embedding (and, given a bank, the scoring) for `settings.batch_size` images
  ahead of use, so that timed work excludes compilation; with a `mesh`, for work split over it
  (the bank is split by rows once, and kept for `score_batch`)."""
  size = settings.image_size
  shape = (settings.batch_size, size, size, 3)
  variables = backbone.variables
  if mesh is None:
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  else:
    _check_mesh_batch(settings.batch_size, mesh)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(sharded.AXIS)))
    variables = _on_mesh(variables, mesh, _replicate)
  static = _static(model=backbone.model, stages=tuple(backbone.stages), **settings.feature_config)
  compiled(_embed, static, variables, spec)
  if bank is not None:
    feats = jax.eval_shape(functools.partial(_embed, **dict(static)), variables, spec)
    if mesh is not None:
      bank = _on_mesh(bank, mesh, sharded.shard_bank)
      feats = jax.ShapeDtypeStruct(feats.shape, feats.dtype, sharding=spec.sharding)
    compiled(_score, _score_static(settings, mesh), bank, feats)


def score_batch(bank, feats, settings, mesh=None, *, with_index=False):
  """feats [B, h, w, D] -> (image scores [B], maps [B, S, S], patch scores [B, h, w]) and, with
  `with_index`, each patch's nearest bank row [B, h * w]. With a `mesh`, the bank is split by
  rows over it (once per bank) and searched there."""
  if mesh is not None:
    bank = _on_mesh(bank, mesh, sharded.shard_bank)
  fn = compiled(_score, _score_static(settings, mesh, with_index), bank, feats)
  return fn(bank, feats)


def predict_fn(backbone, *, image_size, patch_size=3, stride=1, pretrain_dim=1024, target_dim=1024,
               k=1, distance='squared_l2', sigma=4.0, reweight=False, reweight_neighbours=9,
               precision='highest'):
  """One jitted `(variables, bank, images [B, S, S, 3]) -> (image scores [B], maps [B, S, S],
  patch scores [B, h, w])`: embedding and scoring in a single program (what `deploy.export`
  serialises). `predict` runs the same two stages as two compiled calls instead, so that the
  backbone's compilation is shared with `fit`."""
  feature = dict(patch_size=patch_size, stride=stride, pretrain_dim=pretrain_dim,
                 target_dim=target_dim)
  score = dict(image_size=image_size, k=k, distance=distance, sigma=sigma, reweight=reweight,
               reweight_neighbours=reweight_neighbours, precision=precision)

  def fn(variables, bank, images):
    feats = _embed(variables, images, model=backbone.model, stages=tuple(backbone.stages),
                   **feature)
    return _score(bank, feats, **score)

  return jax.jit(fn)


# ----------------------------------------------------------------------------- Images in batches.


def image_batches(images, settings, *, num_workers=2):
  """Yields (images [batch_size, S, S, 3] float32 in [0, 1], count), zero-padded.

  `images`: a sequence of paths, a uint8 array [N, H, W, 3] (resized and cropped per
  `settings`), or a float array [N, S, S, 3] in [0, 1] at the input size S.
  """
  bs = settings.batch_size
  if isinstance(images, (np.ndarray, jax.Array)):
    array = np.asarray(images)
    if array.ndim != 4 or array.shape[-1] != 3:
      raise ValueError(f'expected images [N, H, W, 3], got shape {array.shape}')
    if array.dtype != np.uint8:
      size = settings.image_size
      if array.shape[1:3] != (size, size):
        raise ValueError(f'float images must already be {size} x {size} (the input size), got '
                         f'{array.shape[1:3]}; pass uint8 images to resize them')
    for start in range(0, len(array), bs):
      chunk = array[start:start + bs]
      if array.dtype == np.uint8:
        chunk = [transforms.from_array(x, **settings.image_config) for x in chunk]
      else:
        chunk = list(np.asarray(chunk, np.float32))
      yield data_common.pad_batch(chunk, bs), len(chunk)
    return
  for batch, _, count in data_common.iterate_batches(
      list(images), batch_size=bs, image_config=settings.image_config, num_workers=num_workers):
    yield batch, count


def progress_bar(total, desc, enabled):
  """A tqdm.auto bar (a widget in notebooks, text in terminals), or None when not `enabled`."""
  if not enabled:
    return None
  from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
  return tqdm_auto.tqdm(total=total, desc=desc, unit='img', leave=False)


# ------------------------------------------------------------------------------ Fit and predict.


def empty_host_bank(rows, dim):
  """An uninitialised float32 numpy [rows, dim] array whose data is 64-byte aligned.

  On CPU, `jax.device_put` of an aligned numpy array aliases it instead of copying, so blocks of
  the bank reach jitted functions (projection, selection) without a copy.
  """
  size = rows * dim * 4
  raw = np.empty(size + 64, np.uint8)
  offset = (-raw.ctypes.data) % 64
  return raw[offset:offset + size].view(np.float32).reshape(rows, dim)


class DiskBank:
  """A float32 memory bank [rows, dim] in an unlinked temporary file, for banks above the fit's
  memory budget.

  Rows are written batch by batch and read back block by block with plain reads, not a memory
  map: the file's pages sit in the kernel's page cache, which the system reclaims as it needs
  to, and never count as the process's resident memory. `coreset.project` reads it like a host
  array (`bank[a:b]`); `take(indices)` gathers the coreset's rows. The file is unlinked as soon
  as it is created, so nothing is left behind, whatever happens to the process.
  """

  def __init__(self, rows, dim, *, directory=None):
    self.shape = (rows, dim)
    self.dtype = np.dtype(np.float32)
    self.nbytes = rows * dim * 4
    self._row_bytes = dim * 4
    self._file = tempfile.TemporaryFile(dir=directory or None)
    self._file.truncate(self.nbytes)

  def write(self, start, rows):
    """Writes rows [n, dim] at row `start`."""
    rows = np.ascontiguousarray(rows, np.float32)
    os.pwrite(self._file.fileno(), rows.tobytes(), start * self._row_bytes)

  def _read(self, start, count):
    data = os.pread(self._file.fileno(), count * self._row_bytes, start * self._row_bytes)
    if len(data) != count * self._row_bytes:
      raise OSError(f'short read from the memory bank file: {len(data)} bytes')
    return np.frombuffer(data, np.float32).reshape(count, self.shape[1])

  def __getitem__(self, rows):
    if not isinstance(rows, slice):
      return self.take(rows)
    start, stop, step = rows.indices(self.shape[0])
    if step != 1:
      raise IndexError('DiskBank supports contiguous slices and take(indices) only')
    out = empty_host_bank(max(stop - start, 0), self.shape[1])
    out[:] = self._read(start, max(stop - start, 0))
    return out

  def take(self, indices):
    """Rows [len(indices), dim] at `indices` (any order), reading runs of consecutive rows."""
    indices = np.asarray(indices).reshape(-1)
    order = np.argsort(indices, kind='stable')
    out = empty_host_bank(len(indices), self.shape[1])
    sorted_idx = indices[order]
    i = 0
    while i < len(sorted_idx):
      j = i + 1
      while j < len(sorted_idx) and sorted_idx[j] - sorted_idx[j - 1] <= 1:
        j += 1
      first = int(sorted_idx[i])
      run = self._read(first, int(sorted_idx[j - 1]) - first + 1)
      out[order[i:j]] = run[sorted_idx[i:j] - first]
      i = j
    return out

  def close(self):
    self._file.close()


def timed_iter(iterable, timings, name):
  """Yields from `iterable`, adding the seconds spent waiting for each item to timings[name]
  (when `timings` is a dict; e.g. the wait for images decoded in worker threads)."""
  iterator = iter(iterable)
  while True:
    start = time.perf_counter()
    try:
      item = next(iterator)
    except StopIteration:
      return
    if timings is not None:
      timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    yield item


def build_memory_bank(embed_fn, batches, *, num_images, progress=None, timings=None,
                      memory_budget_bytes=None, spill_dir=None):
  """Stacks the patch features of all training images into one [num_images * h * w, D] bank.

  Args:
    embed_fn: images [B, H, W, 3] -> [B, h, w, D].
    batches: iterable of (images, masks, count) as from `data.iterate_batches`, or of
      (images, count).
    num_images: total number of images in `batches` (to allocate the bank once).
    progress: optional callable(images done) after every batch.
    timings: optional dict; 'decode_wait' accumulates the seconds spent waiting for batches.
    memory_budget_bytes: a bank larger than this goes to a `DiskBank` (None: no limit).
    spill_dir: the DiskBank's directory (None: the system's temporary directory).
  Returns:
    float32 numpy array [num_images * h * w, D], or a DiskBank of that shape.
  """
  bank = None
  filled = 0
  per_image = 1
  start = time.perf_counter()
  for batch in timed_iter(batches, timings, 'decode_wait'):
    images, count = batch[0], batch[-1]
    feats = np.asarray(embed_fn(jnp.asarray(images)))[:count]  # [count, h, w, D]
    per_image = feats.shape[1] * feats.shape[2]
    if bank is None:
      rows, dim = num_images * per_image, feats.shape[-1]
      if memory_budget_bytes is not None and rows * dim * 4 > memory_budget_bytes:
        bank = DiskBank(rows, dim, directory=spill_dir)
        logging.info('memory bank: %.2f GiB > budget %.2f GiB: streaming it to a file in %s',
                     rows * dim * 4 / 2**30, memory_budget_bytes / 2**30,
                     spill_dir or tempfile.gettempdir())
      else:
        bank = empty_host_bank(rows, dim)
    if isinstance(bank, DiskBank):
      bank.write(filled, feats.reshape(-1, feats.shape[-1]))
    else:
      bank[filled:filled + count * per_image] = feats.reshape(-1, feats.shape[-1])
    filled += count * per_image
    done = filled // per_image
    if progress is not None:
      progress(done)
    logging.log_every_n_seconds(logging.INFO, 'memory bank: %d/%d images (%.1f images/s)', 10,
                                done, num_images, done / (time.perf_counter() - start))
  if bank is None or filled != bank.shape[0]:
    raise ValueError(f'expected {num_images} images, got {filled // per_image}')
  return bank


def subsample(bank_features, *, percentage, key, projection_dim=128, num_starts=10,
              block_size=128, precision='highest', screen=True, progress=False, mesh=None):
  """Approximate greedy coreset of `bank_features` [N, D] -> (knn.Bank, indices [M]).

  `screen` adds the bfloat16 screening copy to the bank (`knn.screened_nearest_neighbour`);
  `progress` shows a progress bar of the greedy iterations (besides the log lines); `mesh`
  splits the greedy loop over its devices (`sharded.greedy_coreset_loop`: the same picks, and
  one progress report at the end).

  A host (numpy) bank stays on the host: only its projection and the selected rows go to the
  device, so memory holds one full-precision copy of the bank plus its projection. A `DiskBank`
  is read block by block for the projection and its selected rows gathered from the file: memory
  then holds the projection, one block and the selected rows.
  """
  start = time.perf_counter()
  bar = progress_bar(int(bank_features.shape[0] * percentage), 'coreset',
                      progress and percentage < 1.0)

  def report(done, total):
    logging.info('coreset: %d/%d points (%.1f ms per iteration)', done, total,
                 1000 * (time.perf_counter() - start) / done)
    if bar is not None:
      bar.update(done - bar.n)

  loop = None
  if mesh is not None:
    loop = lambda projected_t, init, *, num_samples, precision, **_: sharded.greedy_coreset_loop(
        projected_t, init, num_samples=num_samples, mesh=mesh, precision=precision)
  indices = coreset.approximate_greedy_coreset(
      bank_features, percentage=percentage, key=key, projection_dim=projection_dim,
      num_starts=num_starts, precision=precision, chunk_size=2000, progress=report, loop=loop,
      pad_to=coreset.BLOCK_SIZE * (mesh.size if mesh is not None else 1))
  if mesh is not None:
    report(len(indices), len(indices))
  if bar is not None:
    bar.close()
  if isinstance(bank_features, DiskBank):
    selected = bank_features.take(np.asarray(indices))
  elif percentage == 1.0:
    selected = bank_features
  elif isinstance(bank_features, np.ndarray):
    selected = bank_features[np.asarray(indices)]
  else:
    selected = bank_features[indices]
  return knn.prepare_bank(selected, block_size=block_size, screen=screen), indices


def check_bank_size(backbone, settings, num_images):
  """Raises errors.UserError, before any image is read, when the coreset would keep no patch or
  fewer patches than `settings.k` neighbours. Returns the memory bank's size."""
  size = settings.image_size
  spec = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  static = dict(model=backbone.model, stages=tuple(backbone.stages), **settings.feature_config)
  _, h, w, _ = jax.eval_shape(functools.partial(_embed, **static), backbone.variables, spec).shape
  rows = num_images * h * w
  kept = rows if settings.percentage == 1.0 else int(rows * settings.percentage)
  if kept < 1:
    raise errors.UserError(
        f'percentage ({CONFIG_FIELDS["percentage"]}) = {settings.percentage} of {rows} patches '
        f'({num_images} images x {h} x {w}) keeps none: raise it')
  if settings.k > kept:
    raise errors.UserError(
        f'k ({CONFIG_FIELDS["k"]}) = {settings.k} is larger than the memory bank, {kept} patches '
        f'({settings.percentage:g} of {num_images} images x {h} x {w}): at most {kept}')
  return kept


def holdout_threshold(scores, *, target_fpr):
  """The (m+1)-th largest of n scores, m = floor(target_fpr * n): at most m lie above it."""
  scores = np.sort(np.asarray(scores, np.float64))[::-1]
  if not len(scores):
    raise ValueError('no held-out scores to calibrate on')
  m = min(int(np.floor(target_fpr * len(scores))), len(scores) - 1)
  return float(scores[m])


def split_holdout(num_images, *, holdout, seed):
  """(train indices, held-out indices), both sorted: round(holdout * N) images (at least one
  when holdout > 0, and at least one left to fit on), chosen by a seeded permutation."""
  if not 0.0 <= holdout < 1.0:
    raise errors.UserError(f'holdout={holdout} is not allowed: must be in [0, 1)')
  count = 0 if holdout == 0 else max(1, int(round(holdout * num_images)))
  if count >= num_images:
    raise errors.UserError(f'holdout={holdout} of {num_images} images leaves none to fit on')
  order = np.random.default_rng(seed).permutation(num_images)
  return np.sort(order[count:]), np.sort(order[:count])


def fit(backbone, images, *, holdout=0.0, target_fpr=0.01, key=None, num_workers=2,
        progress=True, memory_budget_bytes=None, spill_dir=None, mesh=None, **settings):
  """Fits PatchCore on good images.

  Args:
    backbone: a `backbones.Backbone` (prepared as it should score: probe passes and BatchNorm
      folding are recorded from it).
    images: paths (or `data.Sample` records), or a uint8 [N, H, W, 3] / float [N, S, S, 3]
      array (see module docstring).
    holdout: fraction of `images` held out of the memory bank to calibrate the threshold on
      (0: no threshold from the fit).
    target_fpr: the held-out images' false-positive rate the threshold aims for.
    key: PRNG key for the coreset (default: jax.random.key(settings.seed)).
    num_workers: image-decoding threads.
    progress: show progress bars (tqdm.auto: in notebooks and terminals).
    memory_budget_bytes: a memory bank larger than this streams to a file (`DiskBank`) in
      `spill_dir` (default: the system's temporary directory); None: always in memory.
    mesh: a `jax.sharding.Mesh` (`sharded.row_mesh`) to split the work over (module docstring);
      None: one device.
    **settings: any field of `Settings` (image_size, percentage, k, ...).
  Returns:
    A `PatchCore`.
  """
  unknown = set(settings) - {f.name for f in dataclasses.fields(Settings)}
  if unknown:
    raise TypeError(f'fit() got unknown settings {sorted(unknown)}; known: '
                    f'{[f.name for f in dataclasses.fields(Settings)]}')
  settings = Settings(**settings).validate()
  if not 0.0 < target_fpr < 1.0:
    raise errors.UserError(f'target_fpr={target_fpr} is not allowed: must be in (0, 1)')
  n = len(images)
  train_idx, holdout_idx = split_holdout(n, holdout=holdout, seed=settings.seed)
  pick = lambda idx: images[idx] if hasattr(images, 'shape') else [images[i] for i in idx]
  train, held = pick(train_idx), pick(holdout_idx)
  key = jax.random.key(settings.seed) if key is None else key

  check_bank_size(backbone, settings, len(train))
  _check_mesh_batch(settings.batch_size, mesh)

  # Several processes (multihost): each embeds its share of the images; the coreset spans all.
  start, stop = multihost.share(len(train))
  mine = train[start:stop]
  t0 = time.perf_counter()
  bar = progress_bar(len(mine), 'memory bank', progress)
  update = (lambda done: bar.update(done - bar.n)) if bar is not None else None
  waits = {}
  bank_features = build_memory_bank(
      lambda x: embed_batch(backbone, x, settings, mesh),
      image_batches(mine, settings, num_workers=num_workers), num_images=len(mine),
      progress=update, timings=waits, memory_budget_bytes=memory_budget_bytes,
      spill_dir=spill_dir)
  if bar is not None:
    bar.close()
  feature_seconds = time.perf_counter() - t0
  t1 = time.perf_counter()
  rows = int(multihost.row_counts(bank_features.shape[0]).sum())
  if jax.process_count() == 1:
    bank, _ = subsample(bank_features, percentage=settings.percentage, key=key,
                        projection_dim=settings.projection_dim, num_starts=settings.num_starts,
                        block_size=settings.block_size, precision=settings.precision,
                        screen=settings.screen, progress=progress, mesh=mesh)
  else:
    indices = multihost.coreset_indices(
        bank_features, total_rows=rows, percentage=settings.percentage, key=key,
        projection_dim=settings.projection_dim, num_starts=settings.num_starts,
        precision=settings.precision)
    bank = knn.prepare_bank(multihost.gather_selected(bank_features, indices),
                            block_size=settings.block_size, screen=settings.screen)
  jax.block_until_ready(bank)
  coreset_seconds = time.perf_counter() - t1
  on_disk = isinstance(bank_features, DiskBank)
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
    scores = predict(model, held, num_workers=num_workers, progress=progress,
                     mesh=mesh).image_scores
    threshold = holdout_threshold(scores, target_fpr=target_fpr)
    above = int(np.sum(scores > threshold))
    logging.info('threshold %.6g from %d held-out good images (target FPR %.3g; %d of them above '
                 'it, FPR %.3g; with %d images the FPR moves in steps of %.3g)', threshold,
                 len(scores), target_fpr, above, above / len(scores), len(scores),
                 1 / len(scores))
    model = model.replace(calibration=Calibration(
        image_threshold=threshold, image_threshold_source='holdout', pixel_threshold=threshold,
        pixel_threshold_source='holdout', holdout_scores=tuple(float(s) for s in np.sort(scores)),
        target_fpr=target_fpr))
  return model


def with_threshold(model, image_threshold, *, pixel_threshold=None):
  """The model with a hand-set threshold (source 'manual'); pixel threshold defaults to it."""
  calibration = dataclasses.replace(
      model.calibration, image_threshold=float(image_threshold), image_threshold_source='manual',
      pixel_threshold=float(image_threshold if pixel_threshold is None else pixel_threshold),
      pixel_threshold_source='manual')
  return model.replace(calibration=calibration)


def decide(model, image_scores):
  """(normalised scores, anomalous) of raw image scores, or (None, None) without a threshold."""
  threshold = model.calibration.image_threshold
  if threshold is None:
    return None, None
  scores = np.asarray(image_scores, np.float32)
  return scores / np.float32(2.0 * threshold), scores > threshold


def predict_batches(model, batches, *, timings=None, mesh=None):
  """Yields (image scores [count], maps [count, S, S], patch scores [count, h, w], seconds) per
  (images [B, S, S, 3], count) batch; seconds is the compute time, waited for.

  `mesh`: split each batch over its devices and search the bank split by rows over them (module
  docstring).

  `timings`: optional dict accumulating seconds: 'decode_wait' (waiting for `batches`),
  'features' (backbone and patch features) and 'knn_maps' (search, scores and maps); the two
  compute stages are then waited for separately.
  """
  for images, count in timed_iter(batches, timings, 'decode_wait'):
    start = time.perf_counter()
    feats = embed_batch(model.backbone, images, model.settings, mesh)
    if timings is not None:
      jax.block_until_ready(feats)
      middle = time.perf_counter()
      timings['features'] = timings.get('features', 0.0) + middle - start
    scores, maps, grid = score_batch(model.bank, feats, model.settings, mesh)
    scores, maps, grid = np.asarray(scores), np.asarray(maps), np.asarray(grid)  # Waits.
    end = time.perf_counter()
    if timings is not None:
      timings['knn_maps'] = timings.get('knn_maps', 0.0) + end - middle
    yield scores[:count], maps[:count], grid[:count], end - start


def predict(model, images, *, num_workers=2, progress=False, mesh=None):
  """Scores `images` (paths or arrays, see module docstring) -> `Prediction`; `mesh` as in
  `predict_batches`."""
  parts = ([], [], [])
  bar = progress_bar(len(images), 'predict', progress)
  for scores, maps, grid, _ in predict_batches(
      model, image_batches(images, model.settings, num_workers=num_workers), mesh=mesh):
    for part, value in zip(parts, (scores, maps, grid)):
      part.append(value)
    if bar is not None:
      bar.update(len(scores))
  if bar is not None:
    bar.close()
  if not parts[0]:
    raise ValueError('predict() got no images')
  scores, maps, grid = (np.concatenate(p) for p in parts)
  normalized, anomalous = decide(model, scores)
  return Prediction(scores, normalized, anomalous, maps, grid)
