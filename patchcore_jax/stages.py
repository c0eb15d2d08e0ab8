"""The two compiled test-time stages, and the cache that compiles each once.

  feats = embed_batch(backbone, images, settings)              # [B, h, w, D] patch features
  scores, maps, grid = score_batch(bank, feats, settings)      # image scores, maps, patch scores

`embed` (backbone -> patch features) and `score` (kNN search -> patch scores -> image scores and
smoothed maps) are pure functions; `embed_batch` and `score_batch` run them through a
`StageCache`, which lowers and compiles each (stage, static settings, input shapes) once, so a
fit and the predictions after it, and every category of a multi-category run, share one
backbone compilation. `predict_fn` is both stages as one jitted program (what `deploy.export`
serialises).

`score` searches an exact `knn.Bank` (on one device, or split by rows over a `mesh`:
`sharded.nearest_neighbours`) or an approximate `ivfpq.Index`; everything after the search is
the same code.
"""
import collections
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax import backbones
from patchcore_jax import errors
from patchcore_jax import features as features_lib
from patchcore_jax import ivfpq
from patchcore_jax import knn
from patchcore_jax import scoring
from patchcore_jax import sharded


class StageCache:
  """Compiled stages, one per (function, static arguments, input shapes and shardings), and
  trees placed on device meshes; the least recently used are dropped beyond `max_entries`.

  compile_seconds: seconds spent compiling through this cache so far.
  """

  def __init__(self, max_entries=32):
    self.max_entries = max_entries
    self.compile_seconds = 0.0
    self._compiled = collections.OrderedDict()
    # Trees placed on a mesh, per (tree, mesh, placement); the tree is kept referenced so that
    # its id is not reused while the entry lives.
    self._placed = collections.OrderedDict()

  def __len__(self):
    return len(self._compiled)

  def keys(self):
    """The keys of the compiled stages held, oldest first."""
    return list(self._compiled)

  def clear(self):
    """Forgets every compiled stage (the next use compiles again, as in a fresh process)."""
    self._compiled.clear()
    self._placed.clear()

  def compiled(self, fn, static, *args):
    """`jax.jit(fn, static)` lowered and compiled for `args`' shapes, once.

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
    if key in self._compiled:
      self._compiled.move_to_end(key)
      return self._compiled[key]
    start = time.perf_counter()
    executable = jax.jit(functools.partial(fn, **dict(static))).lower(*args).compile()
    self.compile_seconds += time.perf_counter() - start
    self._compiled[key] = executable
    if len(self._compiled) > self.max_entries:
      self._compiled.popitem(last=False)
    return executable

  def placed(self, tree, mesh, place):
    """place(tree, mesh) (`replicate`, `sharded.shard_bank`), once per tree and mesh."""
    key = (id(tree), mesh, place)
    if key not in self._placed:
      self._placed[key] = (tree, place(tree, mesh))
      if len(self._placed) > 8:
        self._placed.popitem(last=False)
    return self._placed[key][1]


# The cache every stage uses unless given another (one per process, like JAX's own).
DEFAULT_CACHE = StageCache()


def _mesh_sharding(x):
  """x's NamedSharding (a mesh-placed input compiles separately), else None."""
  sharding = getattr(x, 'sharding', None)
  return sharding if isinstance(sharding, jax.sharding.NamedSharding) else None


def replicate(tree, mesh):
  return jax.device_put(tree, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))


def embed(variables, images, *, model, stages, patch_size, stride, pretrain_dim, target_dim,
          dtype='float32'):
  """images [B, S, S, 3] in [0, 1] -> patch features [B, h, w, D] float32 (`features.embed`;
  the backbone computes in `dtype`: `backbones.apply_model`)."""
  apply = functools.partial(backbones.apply_model, model, dtype=dtype)
  return features_lib.embed(apply, variables, images, stages=stages, patch_size=patch_size,
                            stride=stride, pretrain_dim=pretrain_dim, target_dim=target_dim)


def score(bank, feats, *, image_size, k, distance, sigma, reweight, reweight_neighbours,
          precision, mesh=None, with_index=False, nprobe=1):
  """feats [B, h, w, D] -> (image scores [B], maps [B, S, S], patch scores [B, h, w]) and, with
  `with_index`, each patch's nearest bank row [B, h * w].

  `bank`: a `knn.Bank` (exact search; with a `mesh`, split by rows over it:
  `sharded.shard_bank`) or an `ivfpq.Index` (approximate, visiting `nprobe` cells; no Eq. 7).
  """
  b, h, w, d = feats.shape
  queries = feats.reshape(b, h * w, d)
  if isinstance(bank, ivfpq.Index):
    if reweight:
      raise ValueError('Eq. 7 reweighting needs the exact search')
    sq_dist, nn_index = ivfpq.search(queries.reshape(b * h * w, d), bank, nprobe=nprobe, k=k,
                                     precision=precision)
    sq_dist, nn_index = sq_dist.reshape(b, h * w, k), nn_index.reshape(b, h * w, k)
  elif mesh is None:
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


def _embed_static(backbone, settings):
  return _static(model=backbone.model, stages=tuple(backbone.stages), dtype=backbone.dtype,
                 **settings.feature_config)


def _score_static(settings, mesh, with_index=False, nprobe=None):
  extra = dict(mesh=mesh) if mesh is not None else {}
  extra.update(dict(with_index=True) if with_index else {})
  extra.update(dict(nprobe=nprobe) if nprobe is not None else {})
  return _static(**settings.score_config, **extra)


def check_mesh_batch(batch_size, mesh):
  """Raises errors.UserError when `batch_size` images cannot be split evenly over `mesh`."""
  if mesh is not None and batch_size % mesh.size:
    raise errors.UserError(f'batch_size = {batch_size} is not a multiple of the {mesh.size} '
                           'devices it is split over')


def feature_grid(backbone, settings):
  """(h, w): the patch-feature grid of one image at `settings.image_size` (nothing is run)."""
  size = settings.image_size
  spec = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  _, h, w, _ = jax.eval_shape(functools.partial(embed, **dict(_embed_static(backbone, settings))),
                              backbone.variables, spec).shape
  return h, w


def embed_batch(backbone, images, settings, mesh=None, *, cache=DEFAULT_CACHE):
  """images [B, S, S, 3] float32 in [0, 1] -> patch features [B, h, w, D] (compiled once);
  with a `mesh`, the batch is split over its devices."""
  variables = backbone.variables
  if mesh is None:
    images = jnp.asarray(images, jnp.float32)
  else:
    check_mesh_batch(images.shape[0], mesh)
    images = sharded.shard_batch(np.asarray(images, np.float32), mesh)
    variables = cache.placed(variables, mesh, replicate)
  fn = cache.compiled(embed, _embed_static(backbone, settings), variables, images)
  return fn(variables, images)


def score_batch(bank, feats, settings, mesh=None, *, with_index=False, nprobe=None,
                cache=DEFAULT_CACHE):
  """feats [B, h, w, D] -> (image scores [B], maps [B, S, S], patch scores [B, h, w]) and, with
  `with_index`, each patch's nearest bank row [B, h * w] (`score`). With a `mesh`, the bank is
  split by rows over it (once per bank) and searched there; `nprobe` with an `ivfpq.Index`."""
  if mesh is not None:
    bank = cache.placed(bank, mesh, sharded.shard_bank)
  fn = cache.compiled(score, _score_static(settings, mesh, with_index, nprobe), bank, feats)
  return fn(bank, feats)


def precompile(backbone, settings, bank=None, mesh=None, *, cache=DEFAULT_CACHE):
  """Compiles the embedding (and, given a bank, the scoring) for `settings.batch_size` images
  ahead of use, so that timed work excludes compilation; with a `mesh`, for work split over it
  (the bank is split by rows once, and kept for `score_batch`)."""
  size = settings.image_size
  shape = (settings.batch_size, size, size, 3)
  variables = backbone.variables
  if mesh is None:
    spec = jax.ShapeDtypeStruct(shape, jnp.float32)
  else:
    check_mesh_batch(settings.batch_size, mesh)
    spec = jax.ShapeDtypeStruct(shape, jnp.float32, sharding=jax.sharding.NamedSharding(
        mesh, jax.sharding.PartitionSpec(sharded.AXIS)))
    variables = cache.placed(variables, mesh, replicate)
  static = _embed_static(backbone, settings)
  cache.compiled(embed, static, variables, spec)
  if bank is not None:
    feats = jax.eval_shape(functools.partial(embed, **dict(static)), variables, spec)
    if mesh is not None:
      bank = cache.placed(bank, mesh, sharded.shard_bank)
      feats = jax.ShapeDtypeStruct(feats.shape, feats.dtype, sharding=spec.sharding)
    cache.compiled(score, _score_static(settings, mesh), bank, feats)


def predict_fn(backbone, settings):
  """One jitted `(variables, bank, images [B, S, S, 3]) -> (image scores [B], maps [B, S, S],
  patch scores [B, h, w])`: both stages in a single program (what `deploy.export` serialises).
  `predict` runs them as two compiled calls instead, so that the backbone's compilation is
  shared with `fit`."""
  embed_static, score_static = dict(_embed_static(backbone, settings)), settings.score_config

  def fn(variables, bank, images):
    return score(bank, embed(variables, images, **embed_static), **score_static)

  return jax.jit(fn)
