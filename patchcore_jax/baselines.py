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
features; a pixel's score is its L2 distance to the nearest pixel feature (k = 1) of those K
images (the feature pyramid of the first three levels, bilinearly brought to the first one's
grid), upsampled and smoothed as above.
"""
import functools
from typing import NamedTuple, Tuple

import jax
import jax.numpy as jnp
from jax import lax

from patchcore_jax import features as features_lib
from patchcore_jax import scoring

HI = lax.Precision.HIGHEST
PADIM_EPSILON = 0.01  # Added to every position's covariance diagonal.
SPADE_IMAGES = 50  # K: nearest training images.
SPADE_PIXELS = 1  # k: nearest pixel features averaged.
SIGMA = 4.0  # Gaussian smoothing of the maps.


# ------------------------------------------------------------------------------ Gaussians.


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


def mahalanobis_fit(pooled):
  """pooled: per stage, the training images' pooled vectors [N, C_s] -> MahalanobisModel."""
  means, precisions = [], []
  for x in pooled:
    x = jnp.asarray(x, jnp.float32)
    means.append(jnp.mean(x, axis=0))
    precisions.append(jnp.linalg.inv(ledoit_wolf(x)))
  return MahalanobisModel(tuple(means), tuple(precisions))


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


def padim_fit(embeddings, channels, *, epsilon=PADIM_EPSILON):
  """embeddings: [N, H, W, C] of the training images -> PadimModel on `channels`; the unbiased
  covariance of every position plus epsilon I (N >= 2)."""
  x = jnp.take(jnp.asarray(embeddings, jnp.float32), channels, axis=-1)
  n, _, _, d = x.shape
  if n < 2:
    raise ValueError(f'PaDiM needs at least 2 training images, got {n}')
  mean = jnp.mean(x, axis=0)
  c = x - mean
  cov = jnp.einsum('nhwi,nhwj->hwij', c, c, precision=HI) / (n - 1)
  cov = cov + epsilon * jnp.eye(d, dtype=jnp.float32)
  return PadimModel(mean, jnp.linalg.inv(cov), jnp.asarray(channels))


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
  among all pixels of its image's K neighbours."""
  n, h, w, c = train_pyramid.shape

  def one(pyramid, nearest):
    gallery = jnp.take(train_pyramid, nearest, axis=0).reshape(-1, c)
    d = _l2(pyramid.reshape(-1, c), gallery)
    neg, _ = lax.top_k(-d, top)
    return jnp.mean(-neg, axis=1).reshape(h, w)

  return lax.map(lambda args: one(*args), (test_pyramid, neighbours))


def maps_and_scores(grid_scores, *, size, sigma=SIGMA):
  """[B, h, w] position scores -> (maps [B, H, W] upsampled and smoothed, image scores [B]: the
  maps' maxima), as PaDiM and SPADE's pixel scores are turned into maps."""
  maps = scoring.anomaly_maps(grid_scores, size=size, sigma=sigma)
  return maps, jnp.max(maps, axis=(1, 2))

