"""From nearest-neighbour distances to patch scores, image scores and anomaly maps."""
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from patchcore_jax import features as features_lib

DISTANCES = ('squared_l2', 'l2')


def patch_scores(sq_distances, *, distance='squared_l2'):
  """sq_distances: [..., k] squared L2 to the k nearest bank patches -> [...] scores.

  The official code scores with the mean of the k squared distances ('squared_l2', the default);
  the paper writes plain L2 distances ('l2').
  """
  if distance == 'squared_l2':
    return jnp.mean(sq_distances, axis=-1)
  if distance == 'l2':
    return jnp.mean(jnp.sqrt(sq_distances), axis=-1)
  raise ValueError(f'distance must be one of {DISTANCES}, got {distance!r}')


def image_scores(scores):
  """scores: [B, P] patch scores -> [B] image scores (the maximum patch score)."""
  return jnp.max(scores, axis=-1)


def reweighted_image_scores(queries, scores, nn_index, bank, *, num_neighbours=9,
                            precision='highest'):
  """The paper's Eq. 7 (not implemented by the official code).

  s = (1 - exp||m_test - m*|| / sum_{m in N_b(m*)} exp||m_test - m||) * s*, where m_test is the
  image's highest-scoring patch, s* its score, m* its nearest bank patch and N_b(m*) the
  `num_neighbours` nearest bank patches of m* (m* itself first).

  Args:
    queries: [B, P, D] patch features.
    scores: [B, P] patch scores.
    nn_index: [B, P] index of each patch's nearest bank row.
    bank: a `knn.Bank`.
    num_neighbours: b in Eq. 7.
  Returns:
    [B] reweighted image scores.
  """
  rows = bank.blocks.reshape(-1, bank.blocks.shape[-1])  # [M + padding, D]
  valid = jnp.isfinite(bank.norms.reshape(-1))
  num_neighbours = min(num_neighbours, rows.shape[0])
  precision = lax.Precision(precision)

  def one(q, s, idx):
    worst = jnp.argmax(s)
    m_test = q[worst]  # [D]
    from_star = jnp.where(valid, _sq_dist_row(rows[idx[worst]], rows, precision), jnp.inf)
    _, support = lax.top_k(-from_star, num_neighbours)  # m* itself comes first.
    d = jnp.sqrt(_sq_dist_row(m_test, rows[support], precision))  # [b]
    weight = 1.0 - jax.nn.softmax(d)[0]
    return weight * s[worst]

  return jax.vmap(one)(queries, scores, nn_index)


def _sq_dist_row(x, rows, precision):
  """x: [D], rows: [M, D] -> [M] squared L2 distances, clamped at 0."""
  return jnp.maximum(jnp.sum(rows * rows, axis=1) - 2.0 * jnp.dot(rows, x, precision=precision)
                     + jnp.sum(x * x), 0.0)


def gaussian_matrix(size, *, sigma=4.0, truncate=4.0):
  """[size, size] matrix of `scipy.ndimage.gaussian_filter1d(sigma, truncate, mode='reflect')`.

  scipy's 'reflect' mirrors about the edge (d c b a | a b c d | d c b a); the kernel radius is
  int(truncate * sigma + 0.5).
  """
  radius = int(truncate * float(sigma) + 0.5)
  taps = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
  taps /= taps.sum()
  matrix = np.zeros((size, size), np.float64)
  for i in range(size):
    for t, w in zip(range(-radius, radius + 1), taps):
      j = i + t
      # Reflect repeatedly until inside [0, size).
      while j < 0 or j >= size:
        j = -j - 1 if j < 0 else 2 * size - j - 1
      matrix[i, j] += w
  return matrix.astype(np.float32)


@functools.lru_cache(maxsize=16)
def _map_operators(grid, size, sigma):
  """Row and column operators: Gaussian(sigma) after bilinear upsampling grid -> size."""
  ops = []
  for g, s in zip(grid, size):
    up = features_lib.interpolation_matrix(g, s).astype(np.float64)
    ops.append(np.matmul(gaussian_matrix(s, sigma=sigma).astype(np.float64), up) if sigma > 0
               else up)
  return tuple(o.astype(np.float32) for o in ops)


def anomaly_maps(grid_scores, *, size, sigma=4.0):
  """grid_scores: [B, h, w] patch scores -> [B, H, W] anomaly maps.

  Bilinear upsampling (align_corners=False) to `size`, then a Gaussian filter equal to
  `scipy.ndimage.gaussian_filter(sigma=sigma)` (truncate 4, 'reflect' borders); both are linear and
  separable, so the map is R @ scores @ C^T with precomputed R [H, h] and C [W, w].
  """
  rows, cols = _map_operators(tuple(grid_scores.shape[1:3]), tuple(size), float(sigma))
  hi = lax.Precision.HIGHEST
  x = jnp.einsum('Hh,bhw->bHw', jnp.asarray(rows), grid_scores, precision=hi)
  return jnp.einsum('Ww,bHw->bHW', jnp.asarray(cols), x, precision=hi)
