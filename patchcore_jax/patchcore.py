"""PatchCore as composable pieces: fit a memory bank, score images.

  embed = features.make_embed_fn(backbone)              # images -> [B, h, w, D]
  bank_features = build_memory_bank(embed, batches)      # [N * h * w, D] numpy
  bank = subsample(bank_features, percentage=0.1, key=key)  # knn.Bank
  image_scores, maps, grid = predict(embed, bank, images, image_size=224)

`predict_fn` returns one jitted function from images to scores and maps, so test-time work is a
single compiled call per batch.
"""
import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax import coreset
from patchcore_jax import features as features_lib
from patchcore_jax import knn
from patchcore_jax import scoring


def empty_host_bank(rows, dim):
  """An uninitialised float32 numpy [rows, dim] array whose data is 64-byte aligned.

  On CPU, `jax.device_put` of an aligned numpy array aliases it instead of copying, so blocks of
  the bank reach jitted functions (projection, selection) without a copy.
  """
  size = rows * dim * 4
  raw = np.empty(size + 64, np.uint8)
  offset = (-raw.ctypes.data) % 64
  return raw[offset:offset + size].view(np.float32).reshape(rows, dim)


def build_memory_bank(embed_fn, batches, *, num_images):
  """Stacks the patch features of all training images into one [num_images * h * w, D] array.

  Args:
    embed_fn: images [B, H, W, 3] -> [B, h, w, D].
    batches: iterable of (images, masks, count) as from `data.iterate_batches`.
    num_images: total number of images in `batches` (to allocate the bank once).
  Returns:
    float32 numpy array [num_images * h * w, D].
  """
  bank = None
  filled = 0
  per_image = 1
  start = time.perf_counter()
  for images, _, count in batches:
    feats = np.asarray(embed_fn(jnp.asarray(images)))[:count]  # [count, h, w, D]
    per_image = feats.shape[1] * feats.shape[2]
    if bank is None:
      bank = empty_host_bank(num_images * per_image, feats.shape[-1])
    bank[filled:filled + count * per_image] = feats.reshape(-1, feats.shape[-1])
    filled += count * per_image
    done = filled // per_image
    logging.log_every_n_seconds(logging.INFO, 'memory bank: %d/%d images (%.1f images/s)', 10,
                                done, num_images, done / (time.perf_counter() - start))
  if bank is None or filled != bank.shape[0]:
    raise ValueError(f'expected {num_images} images, got {filled // per_image}')
  return bank


def subsample(bank_features, *, percentage, key, projection_dim=128, num_starts=10,
              block_size=128, precision='highest', screen=True):
  """Approximate greedy coreset of `bank_features` [N, D] -> (knn.Bank, indices [M]).

  `screen` adds the bfloat16 screening copy to the bank (`knn.screened_nearest_neighbour`).

  A host (numpy) bank stays on the host: only its projection and the selected rows go to the
  device, so memory holds one full-precision copy of the bank plus its projection.
  """
  start = time.perf_counter()

  def progress(done, total):
    logging.info('coreset: %d/%d points (%.1f ms per iteration)', done, total,
                 1000 * (time.perf_counter() - start) / done)

  indices = coreset.approximate_greedy_coreset(
      bank_features, percentage=percentage, key=key, projection_dim=projection_dim,
      num_starts=num_starts, precision=precision, chunk_size=2000, progress=progress)
  if percentage == 1.0:
    selected = bank_features
  elif isinstance(bank_features, np.ndarray):
    selected = bank_features[np.asarray(indices)]
  else:
    selected = bank_features[indices]
  return knn.prepare_bank(selected, block_size=block_size, screen=screen), indices


def _predict(embed, variables, bank, images, *, image_size, k, distance, sigma, reweight,
             reweight_neighbours, precision):
  feats = embed(variables, images)  # [B, h, w, D]
  b, h, w, d = feats.shape
  queries = feats.reshape(b, h * w, d)
  sq_dist, nn_index = knn.batch_nearest_neighbours(queries, bank, k=k, precision=precision)
  scores = scoring.patch_scores(sq_dist, distance=distance)  # [B, h*w]
  if reweight:
    image_scores = scoring.reweighted_image_scores(
        queries, scores, nn_index[..., 0], bank, num_neighbours=reweight_neighbours,
        precision=precision)
  else:
    image_scores = scoring.image_scores(scores)
  grid = scores.reshape(b, h, w)
  maps = scoring.anomaly_maps(grid, size=(image_size, image_size), sigma=sigma)
  return image_scores, maps, grid


def predict_fn(backbone, *, image_size, patch_size=3, stride=1, pretrain_dim=1024, target_dim=1024,
               k=1, distance='squared_l2', sigma=4.0, reweight=False, reweight_neighbours=9,
               precision='highest'):
  """Jitted `(variables, bank, images [B, S, S, 3]) -> (image scores [B], maps [B, S, S],
  patch scores [B, h, w])` for a `backbones.Backbone`."""
  embed = functools.partial(
      features_lib.embed, backbone.model.apply, stages=backbone.stages, patch_size=patch_size,
      stride=stride, pretrain_dim=pretrain_dim, target_dim=target_dim)
  return jax.jit(functools.partial(
      _predict, embed, image_size=image_size, k=k, distance=distance, sigma=sigma,
      reweight=reweight, reweight_neighbours=reweight_neighbours, precision=precision))
