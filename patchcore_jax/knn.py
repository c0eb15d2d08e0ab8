"""Exact k-nearest-neighbour search over a memory bank, blocked so memory stays bounded.

Squared distances are ||a||^2 - 2 a.b + ||b||^2, clamped at 0, with an explicit matmul precision
(float32 dots may silently run as TF32/bf16 on GPUs otherwise). The bank is split once into blocks
(`prepare_bank`); the search scans over the blocks keeping a running top-k, and is written for one
image's patches and vmapped over images.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax


class Bank(NamedTuple):
  """A memory bank split into blocks for the scan.

  blocks: [num_blocks, block_size, D] features (zero rows pad the last block).
  norms: [num_blocks, block_size] squared norms, +inf on padding rows so they are never chosen.
  """
  blocks: jax.Array
  norms: jax.Array

  @property
  def size(self):
    return int(jnp.sum(jnp.isfinite(self.norms)))


def prepare_bank(features, *, block_size=128):
  """features: [M, D] -> Bank with blocks of `block_size` rows."""
  m, d = features.shape
  block_size = min(block_size, m)
  pad = (-m) % block_size
  features = jnp.asarray(features, jnp.float32)
  norms = jnp.sum(features * features, axis=1)
  norms = jnp.pad(norms, (0, pad), constant_values=jnp.inf).reshape(-1, block_size)
  blocks = jnp.pad(features, ((0, pad), (0, 0))).reshape(-1, block_size, d)
  return Bank(blocks, norms)


def squared_distances(a, b, *, precision='highest'):
  """a: [P, D], b: [M, D] -> [P, M] squared L2 distances, clamped at 0."""
  a_sq = jnp.sum(a * a, axis=-1, keepdims=True)
  b_sq = jnp.sum(b * b, axis=-1)
  dots = jnp.dot(a, b.T, precision=lax.Precision(precision))
  return jnp.maximum(a_sq - 2.0 * dots + b_sq, 0.0)


def first_argmin_rows(d):
  """(min [P], index of the first min [P] int32) of every row of d [P, M], M < 2**24.

  Two vectorised float reductions: XLA's CPU argmin (a variadic reduce) is several times slower.
  """
  low = jnp.min(d, axis=1, keepdims=True)
  iota = lax.broadcasted_iota(jnp.float32, d.shape, 1)
  index = jnp.min(jnp.where(d == low, iota, jnp.inf), axis=1)
  return low[:, 0], index.astype(jnp.int32)


def _scan_body(carry, block, *, queries, k, precision):
  """One bank block: fold its k best rows per query into the running best (carry)."""
  best_d, best_i, offset = carry
  features, norms = block
  # ||q||^2 is the same for every row of a query: rank by ||b||^2 - 2 q.b and add it at the end.
  # Padding rows have norm +inf, so they never win.
  d = norms - 2.0 * jnp.dot(queries, features.T, precision=precision)  # [P, block]
  if k == 1:
    block_d, block_i = first_argmin_rows(d)
    better = block_d < best_d[:, 0]  # Strict: an earlier block wins ties, as a plain argmin.
    best_d = jnp.where(better, block_d, best_d[:, 0])[:, None]
    best_i = jnp.where(better, block_i + offset, best_i[:, 0])[:, None]
    return (best_d, best_i, offset + features.shape[0]), None
  neg, block_i = lax.top_k(-d, k)
  cand_d = jnp.concatenate([best_d, -neg], axis=1)  # [P, 2k]
  cand_i = jnp.concatenate([best_i, block_i.astype(jnp.int32) + offset], axis=1)
  _, pick = lax.top_k(-cand_d, k)
  best_d = jnp.take_along_axis(cand_d, pick, axis=1)
  best_i = jnp.take_along_axis(cand_i, pick, axis=1)
  return (best_d, best_i, offset + features.shape[0]), None


def nearest_neighbours(queries, bank, *, k=1, precision='highest'):
  """The k nearest bank rows of every query.

  Args:
    queries: [P, D] float32 (one image's patch features).
    bank: a `Bank` from `prepare_bank`.
    k: neighbours to return.
    precision: matmul precision ('highest' keeps float32 on every backend).
  Returns:
    (distances [P, k] squared L2, ascending; indices [P, k] int32 into the bank).
  """
  p = queries.shape[0]
  body = functools.partial(_scan_body, queries=queries, k=k,
                           precision=lax.Precision(precision))
  init = (jnp.full((p, k), jnp.inf, jnp.float32), jnp.zeros((p, k), jnp.int32), jnp.int32(0))
  (best_d, best_i, _), _ = lax.scan(body, init, (bank.blocks, bank.norms))
  q_sq = jnp.sum(queries * queries, axis=1, keepdims=True)
  return jnp.maximum(best_d + q_sq, 0.0), best_i


@functools.partial(jax.jit, static_argnames=('k', 'precision'))
def batch_nearest_neighbours(queries, bank, *, k=1, precision='highest'):
  """queries: [B, P, D] -> (distances [B, P, k], indices [B, P, k]); vmapped over images."""
  return jax.vmap(functools.partial(nearest_neighbours, bank=bank, k=k, precision=precision))(
      queries)
