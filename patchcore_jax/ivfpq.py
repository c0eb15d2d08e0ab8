"""Approximate nearest neighbours: an inverted file with product quantisation (IVF-PQ), in JAX.

The paper's Table 5 row "PatchCore-100 % + IVFPQ" searches the whole bank approximately with
faiss's `IndexIVFPQ` (the official code: 512 lists, 64 sub-quantisers of 8 bits, faiss's default
`nprobe` of 1). This is the same index (Jegou et al., "Product quantization for nearest neighbor
search", 2011), written as jitted JAX functions:

- a coarse quantiser: k-means (`kmeans`, Lloyd's iterations in a `lax.fori_loop`) of the bank into
  `nlist` cells; every bank row is filed under its nearest centroid (an inverted list);
- a product quantiser of the residuals (row minus its centroid): the D dimensions are cut into
  `subquantizers` groups of D / m, each with its own 256-centroid codebook (k-means again), so a
  row is stored as m bytes;
- search (`search`): a query's `nprobe` nearest cells are visited; for each, a distance table
  [m, 256] of the query's residual to every codeword is computed once, and a stored row's
  distance is the sum of m table entries picked by its code (asymmetric distance computation:
  the query is not quantised). The k smallest over the visited rows are returned.

The returned distances are the ADC estimates ||q - c - r_hat||^2 (what faiss returns), not exact
distances, so scores computed from them carry the quantisation error as well as the missed
neighbours. `recall_at_1` measures the latter against an exact search.

Shapes are static: the inverted lists are padded to the longest (`Index.ids` is -1 in the
padding), so a query costs nprobe x longest-list table lookups.
"""
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

CODEBOOK_SIZE = 256  # 8-bit codes.


class Index(NamedTuple):
  """An IVF-PQ index (a pytree of arrays).

  coarse: [nlist, D] float32 cell centroids.
  codebooks: [m, 256, D // m] float32 product-quantiser codewords (of residuals).
  codes: [nlist, L, m] uint8 codes of each cell's rows, L the longest list (padded with 0).
  ids: [nlist, L] int32 bank row of each code, -1 in the padding.
  """
  coarse: jax.Array
  codebooks: jax.Array
  codes: jax.Array
  ids: jax.Array

  @property
  def size(self):
    return int(jnp.sum(self.ids >= 0))


def _sq_dist(x, c, precision):
  """[n, d], [k, d] -> [n, k] squared distances (clamped at 0)."""
  dot = jnp.dot(x, c.T, precision=precision)
  return jnp.maximum(jnp.sum(x * x, 1)[:, None] - 2.0 * dot + jnp.sum(c * c, 1)[None, :], 0.0)


def _assign_groups(x, centroids, *, block_size, precision):
  """Nearest codeword per group: x [m, n, d], centroids [m, k, d] -> [m, n] int32 (every group
  in one batched product per block of rows)."""
  m, n, d = x.shape
  size = min(block_size, n)
  pad = (-n) % size
  blocks = jnp.pad(x, ((0, 0), (0, pad), (0, 0))).reshape(m, -1, size, d).transpose(1, 0, 2, 3)
  c_sq = jnp.sum(centroids * centroids, -1)[:, None, :]

  def one(b):  # [m, size, d] -> [m, size]
    dot = jnp.einsum('mnd,mkd->mnk', b, centroids, precision=precision)
    return jnp.argmin(c_sq - 2.0 * dot, axis=-1).astype(jnp.int32)

  return jax.lax.map(one, blocks).transpose(1, 0, 2).reshape(m, -1)[:, :n]


def _group_kmeans_body(_, centroids, *, x, block_size, precision):
  """One Lloyd step of every group: x [m, n, d], centroids [m, k, d] -> new centroids; an empty
  cluster keeps its centroid."""
  m, k, d = centroids.shape
  labels = _assign_groups(x, centroids, block_size=block_size, precision=precision)
  flat = (labels + (jnp.arange(m, dtype=jnp.int32) * k)[:, None]).reshape(-1)
  sums = jax.ops.segment_sum(x.reshape(-1, d), flat, num_segments=m * k).reshape(m, k, d)
  counts = jax.ops.segment_sum(jnp.ones(flat.shape, x.dtype), flat,
                               num_segments=m * k).reshape(m, k, 1)
  return jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centroids)


def assign(x, centroids, *, block_size=4096, precision='highest'):
  """Nearest centroid of every row: x [n, d], centroids [k, d] -> [n] int32 (blocked over rows;
  the one-group case of `_assign_groups`)."""
  return _assign_groups(x[None], centroids[None], block_size=block_size, precision=precision)[0]


@functools.partial(jax.jit, static_argnames=('k', 'iterations', 'block_size', 'precision'))
def kmeans(x, *, k, key, iterations=20, block_size=4096, precision='highest'):
  """Lloyd's k-means: x [n, d] float32 -> centroids [k, d], started from k distinct random rows
  (seeded by `key`); `iterations` assignment + update steps; an empty cluster keeps its
  centroid. Needs n >= k. (The one-group case of `group_kmeans`, with its own start.)"""
  start = x[jax.random.permutation(key, x.shape[0])[:k]]
  body = functools.partial(_group_kmeans_body, x=x[None], block_size=block_size,
                           precision=precision)
  return jax.lax.fori_loop(0, iterations, body, start[None])[0]


@functools.partial(jax.jit, static_argnames=('k', 'iterations', 'block_size', 'precision'))
def group_kmeans(x, *, k, key, iterations=20, block_size=4096, precision='highest'):
  """k-means of m independent groups at once (the product quantiser's codebooks):
  x [m, n, d] -> centroids [m, k, d], each group started from k distinct random rows."""
  m, n, _ = x.shape
  keys = jax.random.split(key, m)
  start = jax.vmap(lambda g, kk: g[jax.random.permutation(kk, n)[:k]])(x, keys)
  body = functools.partial(_group_kmeans_body, x=x, block_size=block_size, precision=precision)
  return jax.lax.fori_loop(0, iterations, body, start)


@functools.partial(jax.jit, static_argnames=('m', 'block_size', 'precision'))
def encode(residuals, codebooks, *, m, block_size=4096, precision='highest'):
  """residuals [n, D] -> codes [n, m] uint8: each sub-vector's nearest codeword."""
  n, d = residuals.shape
  sub = residuals.reshape(n, m, d // m).transpose(1, 0, 2)  # [m, n, D/m]
  return _assign_groups(sub, codebooks, block_size=block_size, precision=precision).T.astype(
      jnp.uint8)


def build(bank, *, nlist=512, subquantizers=64, key, train_rows=65536, pq_train_rows=9984,
          iterations=20, block_size=4096, precision='highest'):
  """Trains an IVF-PQ index on `bank` [N, D] (numpy or jax, float32) and files every row in it.

  The coarse quantiser is trained on at most `train_rows` random rows, the codebooks on the
  residuals of the first `pq_train_rows` of them (9,984 = 39 per codeword, faiss's minimum
  without a warning; each k-means step there costs m x rows x 256 distances); every row is then
  assigned and encoded. D must be divisible by
  `subquantizers`, N at least max(nlist, 256).
  Returns:
    An `Index`.
  """
  bank = np.asarray(bank, np.float32)
  n, d = bank.shape
  if d % subquantizers:
    raise ValueError(f'the dimension {d} is not divisible by subquantizers={subquantizers}')
  if n < max(nlist, CODEBOOK_SIZE):
    raise ValueError(f'{n} rows are too few for nlist={nlist} and {CODEBOOK_SIZE} codewords')
  k_rows, k_coarse, k_pq = jax.random.split(key, 3)
  rows = np.sort(np.asarray(jax.random.permutation(k_rows, n)[:min(n, train_rows)]))
  sample = jnp.asarray(bank[rows])
  coarse = kmeans(sample, k=nlist, key=k_coarse, iterations=iterations, block_size=block_size,
                  precision=precision)
  residuals = sample - coarse[assign(sample, coarse, block_size=block_size, precision=precision)]
  dsub = d // subquantizers
  sub = residuals[:pq_train_rows].reshape(-1, subquantizers, dsub).transpose(1, 0, 2)
  codebooks = group_kmeans(sub, k=CODEBOOK_SIZE, key=k_pq, iterations=iterations,
                           block_size=block_size, precision=precision)
  lists, codes = [], []
  for i in range(0, n, 65536):  # Assign and encode the bank in chunks (bounded memory).
    chunk = jnp.asarray(bank[i:i + 65536])
    cell = assign(chunk, coarse, block_size=block_size, precision=precision)
    lists.append(np.asarray(cell))
    codes.append(np.asarray(encode(chunk - coarse[cell], codebooks, m=subquantizers,
                                   block_size=block_size, precision=precision)))
  lists, codes = np.concatenate(lists), np.concatenate(codes)
  counts = np.bincount(lists, minlength=nlist)
  longest = int(counts.max())
  order = np.argsort(lists, kind='stable')
  slot = np.arange(n) - np.repeat(np.cumsum(counts) - counts, counts)  # Position in its list.
  ids = np.full((nlist, longest), -1, np.int32)
  packed = np.zeros((nlist, longest, subquantizers), np.uint8)
  ids[lists[order], slot] = order
  packed[lists[order], slot] = codes[order]
  return Index(coarse=coarse, codebooks=codebooks, codes=jnp.asarray(packed),
               ids=jnp.asarray(ids))


def _search_block(queries, index, *, nprobe, k, precision):
  """queries [b, D] -> (ADC squared distances [b, k], bank rows [b, k]; -1 where fewer than k
  rows were visited)."""
  b, d = queries.shape
  m, _, dsub = index.codebooks.shape
  _, probes = jax.lax.top_k(-_sq_dist(queries, index.coarse, precision), nprobe)  # [b, nprobe]
  residual = (queries[:, None, :] - index.coarse[probes]).reshape(b, nprobe, m, dsub)
  books = index.codebooks
  tables = (jnp.sum(residual * residual, -1)[..., None]
            - 2.0 * jnp.einsum('bpmd,mkd->bpmk', residual, books, precision=precision)
            + jnp.sum(books * books, -1)[None, None])  # [b, nprobe, m, 256]
  codes = index.codes[probes].astype(jnp.int32)  # [b, nprobe, L, m]
  length = codes.shape[2]
  flat = codes + (jnp.arange(m, dtype=jnp.int32) * CODEBOOK_SIZE)[None, None, None, :]
  entries = jnp.take_along_axis(tables.reshape(b, nprobe, 1, m * CODEBOOK_SIZE),
                                flat.reshape(b, nprobe, length * m)[:, :, None, :], axis=-1)
  dist = entries.reshape(b, nprobe, length, m).sum(-1)
  ids = index.ids[probes]  # [b, nprobe, L]
  dist = jnp.where(ids >= 0, dist, jnp.inf).reshape(b, nprobe * length)
  neg, pos = jax.lax.top_k(-dist, k)
  rows = jnp.take_along_axis(ids.reshape(b, nprobe * length), pos, axis=1)
  return jnp.maximum(-neg, 0.0), jnp.where(jnp.isfinite(neg), rows, -1)


@functools.partial(jax.jit, static_argnames=('nprobe', 'k', 'block_size', 'precision'))
def search(queries, index, *, nprobe=1, k=1, block_size=64, precision='highest'):
  """Approximate k nearest bank rows of every query.

  Args:
    queries: [Q, D] float32.
    index: an `Index`.
    nprobe: cells visited per query (<= nlist).
    k: neighbours returned (<= nprobe x longest list).
    block_size: queries per step (bounds the [block, nprobe, L, m] lookups in memory).
  Returns:
    (squared distances [Q, k] float32, ADC estimates, ascending; bank rows [Q, k] int32).
  """
  q, d = queries.shape
  size = min(block_size, q)
  pad = (-q) % size
  blocks = jnp.pad(queries, ((0, pad), (0, 0))).reshape(-1, size, d)
  dist, rows = jax.lax.map(
      lambda x: _search_block(x, index, nprobe=nprobe, k=k, precision=precision), blocks)
  return dist.reshape(-1, k)[:q], rows.reshape(-1, k)[:q]


def recall_at_1(approximate_rows, exact_rows):
  """Share of queries whose approximate nearest row is the exact nearest row."""
  return float(np.mean(np.asarray(approximate_rows).reshape(-1)
                       == np.asarray(exact_rows).reshape(-1)))
