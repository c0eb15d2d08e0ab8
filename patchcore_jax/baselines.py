"""The paper's baselines as pure JAX functions: MahalanobisAD, PaDiM and SPADE.

Each works on the same backbones and stage maps as PatchCore ({stage: [B, h, w, C]} from
`backbones.apply_model`), with its own paper's hyperparameters as defaults; distances are float32
with every matmul at HIGHEST precision.

MahalanobisAD (Rippel, Mertens, Merhof 2020, "Modeling the distribution of normal data in
pre-trained deep features for anomaly detection"): every stage's map is average-pooled over space;
one multivariate Gaussian per stage is fitted to the training images' pooled vectors, its
covariance shrunk by Ledoit and Wolf's formula; an image's score is the sum over stages of its
Mahalanobis distances. Image level only (no map).

PaDiM (Defard et al. 2021, "PaDiM: a Patch Distribution Modeling Framework for Anomaly Detection
and Localization"): the maps of the first three levels are brought to the first one's grid by
repetition (each deeper cell covers its block, as the authors' embedding_concat does), joined
along the channels, and a random subset of `d` channels kept (100 for ResNet-18's 448, 550 for
WideResNet-50's 1792); every grid position gets its own Gaussian, covariance plus 0.01 I. A test
position's score is its Mahalanobis distance to its position's Gaussian; the grid of scores is
upsampled bilinearly to the image, smoothed by a Gaussian of sigma 4 (`scoring.anomaly_maps`), and
the image score is the map's maximum.

SPADE (Cohen & Hoshen 2020, "Sub-Image Anomaly Detection with Deep Pyramid Correspondences"): an
image's score is its mean L2 distance to its K = 50 nearest training images in the pooled deepest
level's features (level 4 where the backbone has it, as the paper's pre-classifier features); a
pixel's score is its L2 distance to the nearest pixel feature (k = 1) of those K
images (the feature pyramid of the first three levels, bilinearly brought to the first one's
grid), upsampled and smoothed as above.
"""
import functools
import time
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from patchcore_jax import backbones as backbones_lib
from patchcore_jax import features as features_lib
from patchcore_jax import knn
from patchcore_jax import scoring

HI = lax.Precision.HIGHEST
PADIM_EPSILON = 0.01  # Added to every position's covariance diagonal.
SPADE_IMAGES = 50  # K: nearest training images.
SPADE_PIXELS = 1  # k: nearest pixel features averaged.
SIGMA = 4.0  # Gaussian smoothing of the maps.


# ------------------------------------------------------------------------------ Gaussians.


@jax.jit
def ledoit_wolf(x):
  """x: [N, D] samples -> [D, D] Ledoit-Wolf shrunk covariance (as
  sklearn.covariance.LedoitWolf().fit(x).covariance_: the mean removed, 1/N normalisation)."""
  n, p = x.shape
  x = x - jnp.mean(x, axis=0)
  emp_cov = jnp.dot(x.T, x, precision=HI) / n
  x2 = x * x
  trace = jnp.sum(x2, axis=0) / n  # Per feature.
  mu = jnp.sum(trace) / p
  beta_ = jnp.sum(jnp.dot(x2.T, x2, precision=HI))
  delta_ = jnp.sum(jnp.square(emp_cov * n)) / n**2
  beta = (beta_ / n - delta_) / (p * n)
  delta = (delta_ - 2.0 * mu * jnp.sum(trace) + p * mu**2) / p
  beta = jnp.minimum(beta, delta)
  shrinkage = jnp.where(beta == 0, 0.0, beta / jnp.where(delta == 0, 1.0, delta))
  return (1.0 - shrinkage) * emp_cov + shrinkage * mu * jnp.eye(p, dtype=x.dtype)


def mahalanobis(x, mean, precision):
  """x: [..., D], mean [..., D], precision [..., D, D] (broadcasting) -> [...] distances
  sqrt((x - mean)^T precision (x - mean))."""
  c = x - mean
  return jnp.sqrt(jnp.maximum(jnp.einsum('...i,...ij,...j->...', c, precision, c,
                                         precision=HI), 0.0))


# ------------------------------------------------------------------------------ MahalanobisAD.


class MahalanobisModel(NamedTuple):
  """One Gaussian per stage: means [S] of [C_s], precisions [S] of [C_s, C_s]."""
  means: Tuple[jax.Array, ...]
  precisions: Tuple[jax.Array, ...]


def pool(maps):
  """Stage maps [B, h, w, C] -> [B, C] spatial means."""
  return [jnp.mean(m, axis=(1, 2)) for m in maps]


@jax.jit
def _gaussian(x):
  return jnp.mean(x, axis=0), jnp.linalg.inv(ledoit_wolf(x))


def mahalanobis_fit(pooled):
  """pooled: per stage, the training images' pooled vectors [N, C_s] -> MahalanobisModel."""
  fitted = [_gaussian(jnp.asarray(x, jnp.float32)) for x in pooled]
  return MahalanobisModel(tuple(m for m, _ in fitted), tuple(p for _, p in fitted))


@jax.jit
def mahalanobis_scores(model, pooled):
  """pooled: per stage, [B, C_s] -> image scores [B]: the stages' Mahalanobis distances summed."""
  return sum(mahalanobis(jnp.asarray(x, jnp.float32), m, p)
             for x, m, p in zip(pooled, model.means, model.precisions))


# ------------------------------------------------------------------------------ PaDiM.


class PadimModel(NamedTuple):
  """Per grid position: means [H, W, d], precisions [H, W, d, d]; channels [d] kept."""
  means: jax.Array
  precisions: jax.Array
  channels: jax.Array


def padim_embedding(maps):
  """Stage maps (shallowest first) [B, h_s, w_s, C_s] -> [B, H, W, sum C_s] on the first map's
  grid, each deeper cell repeated over the block it covers (the grids must divide)."""
  b, h, w, _ = maps[0].shape
  out = [maps[0]]
  for m in maps[1:]:
    fh, fw = h // m.shape[1], w // m.shape[2]
    if fh * m.shape[1] != h or fw * m.shape[2] != w:
      raise ValueError(f'a {m.shape[1]}x{m.shape[2]} map does not divide the {h}x{w} grid')
    out.append(jnp.repeat(jnp.repeat(m, fh, axis=1), fw, axis=2))
  return jnp.concatenate(out, axis=-1)


def padim_channels(key, total, d):
  """The `d` of `total` channels PaDiM keeps (drawn once, without replacement), ascending."""
  if not 0 < d <= total:
    raise ValueError(f'PaDiM keeps 0 < d <= {total} channels, got d={d}')
  return jnp.sort(jax.random.permutation(key, total)[:d])


@functools.partial(jax.jit, static_argnames=('epsilon',))
def _padim_gaussians(x, epsilon):
  n, _, _, d = x.shape
  mean = jnp.mean(x, axis=0)
  c = x - mean
  cov = jnp.einsum('nhwi,nhwj->hwij', c, c, precision=HI) / (n - 1)
  return mean, jnp.linalg.inv(cov + epsilon * jnp.eye(d, dtype=jnp.float32))


def padim_fit(embeddings, channels, *, epsilon=PADIM_EPSILON):
  """embeddings: [N, H, W, C] of the training images -> PadimModel on `channels`; the unbiased
  covariance of every position plus epsilon I (N >= 2)."""
  x = jnp.take(jnp.asarray(embeddings, jnp.float32), jnp.asarray(channels), axis=-1)
  if x.shape[0] < 2:
    raise ValueError(f'PaDiM needs at least 2 training images, got {x.shape[0]}')
  mean, precision = _padim_gaussians(x, float(epsilon))
  return PadimModel(mean, precision, jnp.asarray(channels))


@jax.jit
def padim_scores(model, embeddings):
  """embeddings [B, H, W, C] -> [B, H, W] Mahalanobis distances to each position's Gaussian."""
  x = jnp.take(jnp.asarray(embeddings, jnp.float32), model.channels, axis=-1)
  return mahalanobis(x, model.means[None], model.precisions[None])


# ------------------------------------------------------------------------------ SPADE.


def _l2(a, b):
  """a [P, D], b [M, D] -> [P, M] L2 distances."""
  sq = (jnp.sum(a * a, axis=1)[:, None] - 2.0 * jnp.dot(a, b.T, precision=HI)
        + jnp.sum(b * b, axis=1)[None])
  return jnp.sqrt(jnp.maximum(sq, 0.0))


@functools.partial(jax.jit, static_argnames=('k',))
def spade_image_scores(train_pooled, test_pooled, *, k=SPADE_IMAGES):
  """train_pooled [N, C], test_pooled [B, C] -> (scores [B]: the mean L2 distance to the k
  nearest training images, their indices [B, k], nearest first); k is capped at N."""
  k = min(k, train_pooled.shape[0])
  neg, index = lax.top_k(-_l2(jnp.asarray(test_pooled, jnp.float32),
                              jnp.asarray(train_pooled, jnp.float32)), k)
  return jnp.mean(-neg, axis=1), index


def spade_pyramid(maps):
  """Stage maps (shallowest first) -> [B, H, W, sum C_s]: each bilinearly brought to the first
  map's grid (align_corners=False) and joined along the channels."""
  grid = maps[0].shape[1:3]
  return jnp.concatenate([features_lib.resize_bilinear(m, grid) for m in maps], axis=-1)


@functools.partial(jax.jit, static_argnames=('top',))
def spade_pixel_scores(train_pyramid, test_pyramid, neighbours, *, top=SPADE_PIXELS):
  """train_pyramid [N, H, W, C], test_pyramid [B, H, W, C], neighbours [B, K] (training
  images) -> [B, H, W]: every test pixel's mean L2 distance to its `top` nearest pixel features
  among all pixels of its image's K neighbours. The neighbours are scanned one image at a time
  (`knn.scan_partial` on its H * W rows), so memory holds one [H * W, H * W] block of distances."""
  n, h, w, c = train_pyramid.shape
  flat = train_pyramid.reshape(n, h * w, c)
  norms = jnp.sum(flat * flat, axis=-1)

  def one(args):
    pyramid, nearest = args
    queries = pyramid.reshape(h * w, c)

    def step(best, index):
      values, _ = knn.scan_partial(queries, flat[index][None], norms[index][None], k=top)
      merged = jnp.concatenate([best, values], axis=1)
      return -lax.top_k(-merged, top)[0], None

    best, _ = lax.scan(step, jnp.full((h * w, top), jnp.inf, jnp.float32), nearest)
    return jnp.mean(jnp.sqrt(knn.finish_distances(queries, best)), axis=1).reshape(h, w)

  return lax.map(one, (test_pyramid, neighbours))


@functools.partial(jax.jit, static_argnames=('size', 'sigma'))
def maps_and_scores(grid_scores, *, size, sigma=SIGMA):
  """[B, h, w] position scores -> (maps [B, H, W] upsampled and smoothed, image scores [B]: the
  maps' maxima), as PaDiM and SPADE's pixel scores are turned into maps."""
  maps = scoring.anomaly_maps(grid_scores, size=size, sigma=sigma)
  return maps, jnp.max(maps, axis=(1, 2))



# ------------------------------------------------------------------------------ Running one.

METHODS = ('padim', 'spade', 'mahalanobis')
# Channels PaDiM keeps: the authors' 100 of ResNet-18's 448 (22 %) and 550 of WideResNet-50's
# 1792 (31 %); other backbones keep 100, or all their channels when they have fewer.
PADIM_DIMS = {'resnet18': 100, 'wide_resnet50_2': 550}
PADIM_DEFAULT_DIM = 100


def method_stages(method, strides):
  """The stages a method reads, shallowest first, from a backbone's {stage: stride}: levels 1-3
  (strides 4, 8, 16; the last stage of each) for PaDiM; every level from 1 up (strides 4 to 64,
  those the backbone has) for MahalanobisAD and SPADE, whose pixels read levels 1-3 and whose
  images are ranked by the deepest level, pooled (the paper: the last layer before the
  classifier)."""
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  top = 3 if method == 'padim' else 5
  out = []
  for level in range(1, top + 1):
    found = [s for s, v in strides.items() if v == 2 ** (level + 1)
             and s not in ('stem', 'head', 'logits')]
    if found:
      out.append(found[-1])
  if len(out) < 2:
    raise ValueError(f'{method} needs stages at two levels at least, found {out}')
  return tuple(out)


class Run(NamedTuple):
  """What `fit_and_score` measured: image scores [n], maps [n, S, S] (None for MahalanobisAD),
  seconds to fit (features and the model) and to score the test images (features included)."""
  image_scores: np.ndarray
  maps: object
  fit_seconds: float
  test_seconds: float


def fit_and_score(method, backbone, train_batches, test_batches, *, image_size, key,
                  padim_dim=None, spade_images=SPADE_IMAGES, sigma=SIGMA, stages=None):
  """Fits `method` on the training images and scores the test images.

  Args:
    method: one of METHODS.
    backbone: a `backbones.Backbone` returning `stages` (default `method_stages` of the
      method; `backbones.load_backbone(..., stages=...)`), shallowest first.
    train_batches, test_batches: iterables of `data.Batch` (images [B, S, S, 3] in [0, 1]).
    image_size: S (maps are S x S).
    key: PRNG key (PaDiM's channels).
    padim_dim: PaDiM's channels kept (default PADIM_DIMS by backbone, else PADIM_DEFAULT_DIM).
    spade_images: SPADE's K.
    sigma: the maps' Gaussian smoothing.
  Returns:
    A `Run`.
  """
  if method not in METHODS:
    raise ValueError(f'method must be one of {METHODS}, got {method!r}')
  stages = tuple(stages or method_stages(method, backbone.strides))
  missing = [s for s in stages if s not in backbone.stages]
  if missing:
    raise ValueError(f'{method} reads stages {stages}; the backbone returns {backbone.stages}')
  maps_of = functools.partial(_stage_maps, model=backbone.model, dtype=backbone.dtype,
                              returned=tuple(backbone.stages), stages=stages)

  channels = None

  def prepare(maps):  # A batch's stage maps -> what the method keeps of them.
    nonlocal channels
    if method == 'mahalanobis':
      return pool(maps)
    if method == 'padim':
      embedding = padim_embedding(maps)
      if channels is None:
        total = embedding.shape[-1]
        d = min(padim_dim or PADIM_DIMS.get(backbone.name, PADIM_DEFAULT_DIM), total)
        channels = padim_channels(key, total, d)
      return [jnp.take(embedding, channels, axis=-1)]
    return [spade_pyramid(maps[:3]), jnp.mean(maps[-1], axis=(1, 2))]

  def features(batches):
    out = []
    for batch in batches:
      maps = maps_of(backbone.variables, jnp.asarray(batch.images))
      out.append(jax.tree_util.tree_map(lambda m: np.asarray(m)[:batch.count], prepare(maps)))
    return [np.concatenate(parts) for parts in zip(*out)]

  start = time.perf_counter()
  train = features(train_batches)
  if method == 'mahalanobis':
    model = mahalanobis_fit([jnp.asarray(x) for x in train])
  elif method == 'padim':
    model = padim_fit(jnp.asarray(train[0]), jnp.arange(train[0].shape[-1]))
  else:
    model = None
  jax.block_until_ready(model)
  fit_seconds = time.perf_counter() - start
  start = time.perf_counter()
  test = features(test_batches)
  if method == 'mahalanobis':
    scores = np.asarray(mahalanobis_scores(model, [jnp.asarray(x) for x in test]))
    maps = None
  else:
    if method == 'padim':
      grid = padim_scores(model, jnp.asarray(test[0]))
    else:
      scores, nearest = spade_image_scores(jnp.asarray(train[1]), jnp.asarray(test[1]),
                                           k=spade_images)
      grid = spade_pixel_scores(jnp.asarray(train[0]), jnp.asarray(test[0]), nearest)
    maps, max_scores = maps_and_scores(grid, size=(image_size, image_size), sigma=sigma)
    maps = np.asarray(maps)
    scores = np.asarray(max_scores if method == 'padim' else scores)
  return Run(scores, maps, fit_seconds, time.perf_counter() - start)


@functools.partial(jax.jit, static_argnames=('model', 'dtype', 'returned'))
def _all_maps(variables, images, *, model, dtype, returned):
  maps = backbones_lib.apply_model(model, variables, features_lib.normalize(images), dtype=dtype)
  return [maps[s] for s in returned]


def _stage_maps(variables, images, *, model, dtype, returned, stages):
  """The maps of `stages`, in that order, of images in [0, 1]: every returned stage is computed
  by one compiled call (shared by the methods that read the same backbone)."""
  maps = dict(zip(returned, _all_maps(variables, images, model=model, dtype=dtype,
                                      returned=returned)))
  return [maps[s] for s in stages]
