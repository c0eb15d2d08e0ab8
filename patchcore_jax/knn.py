"""Exact k-nearest-neighbour search over a memory bank, blocked so memory stays bounded.

Squared distances are ||a||^2 - 2 a.b + ||b||^2, clamped at 0, with an explicit matmul precision
(float32 dots may silently run as TF32/bf16 on GPUs otherwise). The bank is split once into blocks
(`prepare_bank`); the search scans over the blocks keeping a running top-k, and is written for one
image's patches and vmapped over images.

For k = 1 a bank prepared with `screen=True` is searched by `screened_nearest_neighbour` instead:
a cheap lower bound on every distance screens the bank, and the few candidates whose bound could
still win are measured exactly in float32. The bound lives in `screen_dim` dimensions: with mu the
bank's mean, P its leading principal directions (orthonormal) and r(x) = ||(I - P P^T)(x - mu)||,

  ||q - b||^2 >= ||q - mu||^2 + ||b - mu||^2 - 2 [P^T (q - mu), r(q)] . [P^T (b - mu), r(b)]

(the residual parts' dot product is at most r(q) r(b), Cauchy-Schwarz), so a bfloat16 product of
[screen_dim]-vectors replaces the [1024]-vector one; a relative slack covers every rounding error
(`SCREEN_SLACK`). The answer is the exact nearest neighbour to float32 rounding, as the plain
scan's (not an approximate search): every query whose winner cannot be certified from the screen
is searched again in full float32. Rows whose distances differ by less than float32 resolves may
be returned in either order, by this search as by the scan.
"""
import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

# Rows measured exactly per query by the screened search, and dimensions of the screen
# (SCREEN_DIM - 1 principal directions and the residual norm). On the MVTec bottle 10 % banks,
# test patches certified without the fallback: 512 and 8: 98.5 % (EfficientNet-Lite2; 96.5 % in
# the worst batch of 8 images) and 99.5 % (VGG16); 512 and 16: 99.8 / 99.97 %; 384 and 16:
# 97.4 / 99.0 %. Gathering the candidates' rows costs ~1 ms per candidate per image (XLA's CPU
# gather moves ~3 GB/s), the bfloat16 product ~0.1 ms per dimension.
SCREEN_CANDIDATES = 8
SCREEN_DIM = 512
# Relative slack of the screen's bound, in units of ||q - mu||^2 + ||b - mu||^2. It covers the
# bfloat16 rounding of both screen vectors (<= 2^-8), their float32 projections (worst case
# sqrt(d) gamma_D <= 1.2e-3 each), the products' float32 accumulation and the bound's own
# arithmetic: about 6.5e-3 in the worst case, against 2^-7 = 7.8e-3.
SCREEN_SLACK = 2.0**-7
# Banks with more of their variance outside the screen's directions keep the float32 scan: their
# bounds would be too loose to certify (MVTec bottle banks: 0.7 % with EfficientNet-Lite2, 0.06 %
# with VGG16; Gaussian noise in 1024 dimensions: 50 %).
SCREEN_MAX_RESIDUAL = 0.02
# A search whose first block of queries certifies fewer than this share scans every query.
SCREEN_MIN_CERTIFIED = 0.5
# Smaller banks keep only the float32 scan, faster there (fixed per-query costs of the screen).
SCREEN_MIN_ROWS = 4096
# Bank rows per group of the screen (at most; the screen's groups do not depend on the scan's
# blocks, so a bank in a few large blocks is screened as one in many small ones).
SCREEN_GROUP = 128

# Bank rows per block of the float32 scan, per backend ('auto'). On the CPU a [P, 128] block of
# distances stays in cache (128 was fastest on 2 cores; 1024 ~15 % slower). On an accelerator
# every scan step is a kernel launch and a tiny product: a few large blocks keep it busy, and a
# [8 images, 784 patches, 4096] float32 block is 100 MB.
BLOCK_SIZES = {'cpu': 128}
ACCELERATOR_BLOCK_SIZE = 4096
# The screen ('auto'): on the CPU, where its bfloat16 product and short gathers beat the float32
# scan (1.35x on the 10 % bottle bank); elsewhere the scan, a few large float32 products.
SCREEN_BACKENDS = ('cpu',)


def resolve_block_size(block_size, backend=None):
  """Rows per scan block for `block_size` (a positive int, or 'auto': BLOCK_SIZES on the
  backend, default JAX's, else ACCELERATOR_BLOCK_SIZE)."""
  if block_size == 'auto':
    return BLOCK_SIZES.get(backend or jax.default_backend(), ACCELERATOR_BLOCK_SIZE)
  if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
    raise ValueError(f"block size must be a positive integer or 'auto', got {block_size!r}")
  return int(block_size)


def resolve_screen(screen, backend=None):
  """Whether to screen (True, False, or 'auto': on the backends in SCREEN_BACKENDS)."""
  if screen == 'auto':
    return (backend or jax.default_backend()) in SCREEN_BACKENDS
  if not isinstance(screen, (bool, np.bool_)):
    raise ValueError(f"screen must be True, False or 'auto', got {screen!r}")
  return bool(screen)


def screen_group_size(block_size):
  """Rows per group of the screen of a bank in scan blocks of `block_size` rows: the block
  size up to SCREEN_GROUP, else its largest divisor up to SCREEN_GROUP."""
  for size in range(min(SCREEN_GROUP, block_size), 0, -1):
    if block_size % size == 0:
      return size
  return 1


class Bank(NamedTuple):
  """A memory bank split into blocks for the scan, optionally with a screening copy.

  blocks: [num_blocks, block_size, D] features (zero rows pad the last block).
  norms: [num_blocks, block_size] squared norms, +inf on padding rows so they are never chosen.
  screen_t: [k, num_blocks * block_size] bfloat16 screen vectors of the rows,
    [P^T (b - mu), r(b)], transposed (the layout in which XLA's CPU bfloat16 matmul runs
    fastest), or None.
  screen_norm: [num_blocks * block_size] (1 - SCREEN_SLACK) ||b - mu||^2, 1e30 on padding rows.
  screen_basis: [D, k - 1] P, orthonormal columns.
  screen_mean: [D] mu.
  """
  blocks: jax.Array
  norms: jax.Array
  screen_t: Optional[jax.Array] = None
  screen_norm: Optional[jax.Array] = None
  screen_basis: Optional[jax.Array] = None
  screen_mean: Optional[jax.Array] = None

  @property
  def size(self):
    return int(jnp.sum(jnp.isfinite(self.norms)))


def principal_basis(features, dim):
  """(mean [D], [D, dim] leading principal directions, the share of the variance outside them)
  of features [M, D]; mean and directions as float32 arrays.

  Any orthonormal basis keeps the screen's bound valid; the leading directions make it tight.
  The covariance is accumulated in float32 on the device, its eigenvectors found in float64.
  """
  features = jnp.asarray(features, jnp.float32)
  mean = jnp.mean(features, axis=0)
  centred = features - mean
  covariance = np.asarray(jnp.dot(centred.T, centred, precision=lax.Precision.HIGHEST),
                          np.float64)
  values, vectors = np.linalg.eigh(covariance)  # Ascending eigenvalues.
  values = np.maximum(values[::-1], 0.0)
  residual_share = float(values[dim:].sum() / max(values.sum(), 1e-30))
  return mean, jnp.asarray(vectors[:, ::-1][:, :dim], jnp.float32), residual_share


def screen_vectors(x, mean, basis):
  """x [N, D] -> (screen vectors [N, k] float32 [P^T (x - mu), r(x)], ||x - mu||^2 [N]).

  r(x) comes from ||x - mu||^2 - ||P^T (x - mu)||^2 plus 2^-12 ||x - mu||^2: an overestimate
  (which only lowers the bound) that absorbs that difference's float32 cancellation.
  """
  centred = x - mean
  projected = jnp.dot(centred, basis, precision=lax.Precision.HIGHEST)
  c_sq = jnp.sum(centred * centred, axis=1)
  residual = jnp.sqrt(jnp.maximum(c_sq - jnp.sum(projected * projected, axis=1), 0.0)
                      + 2.0**-12 * c_sq)
  return jnp.concatenate([projected, residual[:, None]], axis=1), c_sq


_screen_vectors_jit = jax.jit(screen_vectors)


def prepare_bank(features, *, block_size='auto', screen=False, screen_min_rows=SCREEN_MIN_ROWS,
                 screen_dim=SCREEN_DIM, backend=None):
  """features: [M, D] -> Bank with blocks of `block_size` rows ('auto': `resolve_block_size`).

  With `screen` (True, or 'auto': `resolve_screen`), a bank of at least `screen_min_rows` rows
  (and more than SCREEN_CANDIDATES screen groups) whose principal directions hold all but
  SCREEN_MAX_RESIDUAL of its variance also gets the screening copy (`screen_dim` dimensions, at
  most D + 1), so k=1 searches take the screened path. `backend` resolves 'auto' (default: JAX's).
  """
  m, d = features.shape
  block_size = min(resolve_block_size(block_size, backend), m)
  screen = resolve_screen(screen, backend)
  pad = (-m) % block_size
  features = jnp.asarray(features, jnp.float32)
  norms = jnp.sum(features * features, axis=1)
  norms = jnp.pad(norms, (0, pad), constant_values=jnp.inf).reshape(-1, block_size)
  blocks = jnp.pad(features, ((0, pad), (0, 0))).reshape(-1, block_size, d)
  columns = blocks.shape[0] * block_size
  if (not screen or m < screen_min_rows
      or columns // screen_group_size(block_size) <= SCREEN_CANDIDATES):
    return Bank(blocks, norms)
  mean, basis, residual_share = principal_basis(features, min(screen_dim - 1, d))
  if residual_share > SCREEN_MAX_RESIDUAL:
    return Bank(blocks, norms)
  vectors, centred_sq = _screen_vectors_jit(features, mean, basis)
  vectors = jnp.pad(vectors, ((0, pad), (0, 0)))
  screen_norm = jnp.pad((1.0 - SCREEN_SLACK) * centred_sq, (0, pad), constant_values=1e30)
  return Bank(blocks, norms, screen_t=jnp.transpose(vectors.astype(jnp.bfloat16)),
              screen_norm=screen_norm, screen_basis=basis, screen_mean=mean)


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
  best_d, best_i = scan_partial(queries, bank.blocks, bank.norms, k=k, precision=precision)
  return finish_distances(queries, best_d), best_i


def scan_partial(queries, blocks, norms, *, k=1, precision='highest'):
  """The scan's ranking values: (||b||^2 - 2 q.b of the k best rows [P, k], ascending; their
  indices [P, k] into blocks [num_blocks, block, D] with norms [num_blocks, block]).

  `finish_distances` turns the values into squared distances. Sharded searches combine these,
  not the finished distances, so that they rank rows exactly as one device does.
  """
  p = queries.shape[0]
  body = functools.partial(_scan_body, queries=queries, k=k,
                           precision=lax.Precision(precision))
  init = (jnp.full((p, k), jnp.inf, jnp.float32), jnp.zeros((p, k), jnp.int32), jnp.int32(0))
  (best_d, best_i, _), _ = lax.scan(body, init, (blocks, norms))
  return best_d, best_i


def finish_distances(queries, partial):
  """Squared distances [P, k] from `scan_partial`'s values for queries [P, D]."""
  q_sq = jnp.sum(queries * queries, axis=1, keepdims=True)
  return jnp.maximum(partial + q_sq, 0.0)


def _min_axis1(x):
  """min over axis 1 of [N, G, C] as a tree of elementwise minimums -> [N, C].

  XLA's CPU reduction over a middle or minor axis runs far below bandwidth; the halving tree fuses
  into one vectorised loop over the minor axis.
  """
  while x.shape[1] > 1:
    h = x.shape[1] // 2
    m = jnp.minimum(x[:, :h], x[:, h:2 * h])
    x = jnp.concatenate([m, x[:, 2 * h:]], axis=1) if x.shape[1] % 2 else m
  return x[:, 0]


def _screen_block(queries, bank, *, candidates):
  """One block of queries [N, D] -> (squared distance [N], index [N], certified [N] bool)."""
  n, d = queries.shape
  columns = bank.screen_t.shape[1]
  group = screen_group_size(bank.blocks.shape[1])
  num_groups = columns // group
  q_screen, q_sq = screen_vectors(queries, bank.screen_mean, bank.screen_basis)
  q_screen = q_screen.astype(jnp.bfloat16)
  q_term = (1.0 - SCREEN_SLACK) * q_sq
  dots = jnp.dot(q_screen, bank.screen_t, preferred_element_type=jnp.float32)  # [N, columns]
  # Lower bound on ||q - b||^2 = q_term + key; the key ranks the rows of one query.
  # Column j = a * num_groups + g belongs to group g, so that a group's minimum reduces a middle
  # axis. The k smallest keys of a row lie in the k groups with the smallest minimums.
  key = (bank.screen_norm.reshape(1, group, num_groups)
         - 2.0 * dots.reshape(n, group, num_groups))
  _, top_groups = lax.top_k(-_min_axis1(key), candidates + 1)  # [N, c + 1]
  near = jnp.take_along_axis(key, top_groups[:, None, :], axis=2).reshape(n, -1)
  # The barrier keeps XLA from folding the later slices into the top-k's sort, which would stop
  # it from becoming the fast TopK call (a full sort instead: 2-3x the whole search's time).
  neg_key, position = lax.optimization_barrier(lax.top_k(-near, candidates + 1))
  index = (position // (candidates + 1)) * num_groups + jnp.take_along_axis(
      top_groups, position % (candidates + 1), axis=1)  # [N, c + 1] bank columns
  rows = bank.blocks.reshape(-1, d)[index[:, :candidates]]  # [N, c, D]
  exact = jnp.sum(jnp.square(queries[:, None, :] - rows), axis=2)  # [N, c], no cancellation
  best_d, best = first_argmin_rows(exact)
  best_i = jnp.take_along_axis(index, best[:, None], axis=1)[:, 0]
  # Certified: no bank row outside the c candidates can be nearer.
  certified = best_d <= q_term - neg_key[:, candidates]
  return best_d, best_i, certified


def screened_nearest_neighbour(queries, bank, *, candidates=SCREEN_CANDIDATES,
                               max_block_floats=2**24):
  """The exact nearest bank row of every query, screened in low dimension (bank from
  `prepare_bank` with `screen=True`, at least `candidates + 1` screen groups).

  Per query: the bfloat16 product of screen vectors gives every row a lower bound on its distance
  (module docstring); the `candidates` rows with the smallest bounds are measured exactly in
  float32 as sum((q - b)^2); if the best of them is no farther than the next smallest bound, it
  is the nearest row. Queries that cannot be certified this way (1-2 % of MVTec bottle test
  patches) are searched again by the plain float32 scan, in the smallest of N/64, N/16 or N
  slots that holds them.

  Args:
    queries: [N, D] float32 (any number of images' patches, flattened).
    bank: a screened `Bank`.
    candidates: rows measured exactly per query.
    max_block_floats: queries are processed in blocks whose [block, bank rows] float32 product
      stays under this many elements.
  Returns:
    (squared distances [N, 1], indices [N, 1] int32), as `nearest_neighbours` with k=1.
  """
  n, d = queries.shape
  columns = bank.screen_t.shape[1]
  groups = columns // screen_group_size(bank.blocks.shape[1])
  if groups < candidates + 1:
    raise ValueError(f'screening needs at least {candidates + 1} screen groups of at most '
                     f'{SCREEN_GROUP} rows, the bank has {groups}')
  block = max(1, min(n, max_block_floats // columns))
  pad = (-n) % block
  blocks = jnp.pad(queries, ((0, pad), (0, 0))).reshape(-1, block, d)
  screen = functools.partial(_screen_block, bank=bank, candidates=candidates)
  first = screen(blocks[0])
  # When the first block certifies too few of its queries (e.g. a whole, dense bank whose nearest
  # rows lie within the screen's slack), the others would too: scan at once instead of paying
  # for the screen and then the scan.
  valid = jnp.arange(block) < n
  first_share = jnp.sum(first[2] & valid) / jnp.sum(valid)

  def scan_all(_):
    dist, index = nearest_neighbours(queries, bank, k=1)
    return dist, index

  def screened(_):
    if blocks.shape[0] == 1:
      parts = first
    else:
      rest = lax.map(screen, blocks[1:])
      parts = tuple(jnp.concatenate([a[None], b]) for a, b in zip(first, rest))
    best_d, best_i, certified = (x.reshape(-1)[:n] for x in parts)
    return _with_fallback(queries, bank, best_d, best_i, certified)

  return lax.cond(first_share >= SCREEN_MIN_CERTIFIED, screened, scan_all, None)


def _with_fallback(queries, bank, best_d, best_i, certified):
  """Screened answers [N] with the uncertified queries searched again by the float32 scan, in the
  smallest of N/64, N/16 or N slots that holds them. -> (distances [N, 1], indices [N, 1])."""
  n = queries.shape[0]
  num_failed = jnp.sum(~certified)

  def search_failed(slots):
    def search(_):
      failed = jnp.nonzero(~certified, size=slots, fill_value=n)[0]
      dist, index = nearest_neighbours(queries[jnp.minimum(failed, n - 1)], bank, k=1)
      return (best_d.at[failed].set(dist[:, 0], mode='drop'),
              best_i.at[failed].set(index[:, 0], mode='drop'))
    return search

  def search_all(_):
    dist, index = nearest_neighbours(queries, bank, k=1)
    return dist[:, 0], index[:, 0]

  tiers = sorted({max(1, n // 64), max(1, n // 16)})
  branches = [lambda _: (best_d, best_i)] + [search_failed(s) for s in tiers] + [search_all]
  bounds = jnp.asarray([0] + tiers, jnp.int32)
  branch = jnp.sum(num_failed > bounds)  # 0: none failed; i: the i-th tier holds them all.
  return tuple(x[:, None] for x in lax.switch(branch, branches, None))


def uses_screen(bank):
  """Whether a k=1 search of `bank` takes the screened path: `prepare_bank` adds the screening
  copy only to banks large enough for it."""
  return bank.screen_t is not None


@functools.partial(jax.jit, static_argnames=('k', 'precision'))
def batch_nearest_neighbours(queries, bank, *, k=1, precision='highest'):
  """queries: [B, P, D] -> (distances [B, P, k], indices [B, P, k]).

  With k = 1 and a screened bank (`prepare_bank(screen=True)`): the exact
  `screened_nearest_neighbour` over all B * P queries at once (`precision` does not apply);
  otherwise `nearest_neighbours` vmapped over images.
  """
  b, p, d = queries.shape
  if k == 1 and uses_screen(bank):
    dist, index = screened_nearest_neighbour(queries.reshape(b * p, d), bank)
    return dist.reshape(b, p, 1), index.reshape(b, p, 1)
  return jax.vmap(functools.partial(nearest_neighbours, bank=bank, k=k, precision=precision))(
      queries)
