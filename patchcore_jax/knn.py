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


def prepare_bank(features, *, block_size=1024):
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


def _scan_body(carry, block, *, queries, q_sq, k, precision):
  best_d, best_i, offset = carry
  features, norms = block
  dots = jnp.dot(queries, features.T, precision=precision)  # [P, block]
  d = jnp.maximum(q_sq - 2.0 * dots + norms, 0.0)
  d = jnp.where(jnp.isfinite(norms), d, jnp.inf)
  if k == 1:
    block_i = jnp.argmin(d, axis=1)[:, None]
    block_d = jnp.take_along_axis(d, block_i, axis=1)
  else:
    neg, block_i = lax.top_k(-d, k)
    block_d = -neg
  cand_d = jnp.concatenate([best_d, block_d], axis=1)  # [P, 2k]
  cand_i = jnp.concatenate([best_i, block_i.astype(jnp.int32) + offset], axis=1)
  if k == 1:
    pick = jnp.argmin(cand_d, axis=1)[:, None]
  else:
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
  body = functools.partial(_scan_body, queries=queries,
                           q_sq=jnp.sum(queries * queries, axis=1, keepdims=True), k=k,
                           precision=lax.Precision(precision))
  init = (jnp.full((p, k), jnp.inf, jnp.float32), jnp.zeros((p, k), jnp.int32), jnp.int32(0))
  (best_d, best_i, _), _ = lax.scan(body, init, (bank.blocks, bank.norms))
  return best_d, best_i


@functools.partial(jax.jit, static_argnames=('k', 'precision'))
def batch_nearest_neighbours(queries, bank, *, k=1, precision='highest'):
  """queries: [B, P, D] -> (distances [B, P, k], indices [B, P, k]); vmapped over images."""
  return jax.vmap(functools.partial(nearest_neighbours, bank=bank, k=k, precision=precision))(
      queries)
