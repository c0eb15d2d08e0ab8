"""Greedy coreset against a brute-force numpy loop (the official algorithm, step by step)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax import coreset


def _numpy_greedy(projected, starts, num_samples):
  """The official ApproximateGreedyCoresetSampler on already projected features, in float64."""
  def dist(a, b):
    return np.sqrt(np.maximum(((a[:, None, :] - b[None]) ** 2).sum(-1), 0))
  min_dist = dist(projected, projected[starts]).mean(axis=1)
  selected = []
  for _ in range(num_samples):
    i = int(np.argmax(min_dist))
    selected.append(i)
    min_dist = np.minimum(min_dist, dist(projected, projected[i:i + 1])[:, 0])
  return np.array(selected)


def _clustered(n, d, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(12, d)) * 5
  return (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, d))).astype(np.float32)


@pytest.mark.parametrize('n,d,percentage', [(500, 32, 0.1), (300, 64, 0.25), (257, 16, 0.01)])
def test_matches_numpy_greedy(n, d, percentage):
  features = jnp.asarray(_clustered(n, d, seed=n))
  key = jax.random.key(3)
  ours = np.asarray(coreset.approximate_greedy_coreset(features, percentage=percentage, key=key,
                                                        projection_dim=8))
  # Rebuild the same projection and starting points, then run the plain algorithm in numpy.
  proj_key, start_key = jax.random.split(key)
  projected = np.matmul(np.asarray(features, np.float64),
                        np.asarray(coreset.random_projection(proj_key, d, 8), np.float64))
  starts = np.asarray(jax.random.choice(start_key, n, (10,), replace=False))
  ref = _numpy_greedy(projected, starts, int(n * percentage))
  assert len(ours) == int(n * percentage)
  np.testing.assert_array_equal(ours, ref)


def test_chunked_loop_equals_single_loop():
  features = jnp.asarray(_clustered(400, 24, seed=1))
  key = jax.random.key(0)
  one = coreset.approximate_greedy_coreset(features, percentage=0.2, key=key, projection_dim=16)
  seen = []
  chunked = coreset.approximate_greedy_coreset(features, percentage=0.2, key=key,
                                               projection_dim=16, chunk_size=7,
                                               progress=lambda d, t: seen.append((d, t)))
  np.testing.assert_array_equal(np.asarray(one), np.asarray(chunked))
  assert seen[-1] == (80, 80) and len(seen) == 12


def test_full_percentage_keeps_everything_and_bad_values_fail():
  features = jnp.ones((10, 4))
  np.testing.assert_array_equal(
      coreset.approximate_greedy_coreset(features, percentage=1.0, key=jax.random.key(0)),
      np.arange(10))
  with pytest.raises(ValueError):
    coreset.approximate_greedy_coreset(features, percentage=0.0, key=jax.random.key(0))
  with pytest.raises(ValueError):
    coreset.approximate_greedy_coreset(features, percentage=0.05, key=jax.random.key(0))


def test_selected_points_are_distinct_and_cover():
  features = jnp.asarray(_clustered(600, 32, seed=5))
  idx = np.asarray(coreset.approximate_greedy_coreset(features, percentage=0.05,
                                                      key=jax.random.key(1)))
  assert len(set(idx.tolist())) == len(idx)
  # Each of the 12 clusters holds at least one coreset point (k-center covers the clusters).
  x = np.asarray(features)
  d = ((x[:, None] - x[idx][None]) ** 2).sum(-1).min(1)
  assert d.max() < np.median(((x[:50, None] - x[None, :50]) ** 2).sum(-1))


def test_projection_is_blocked_correctly():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1000, 20)).astype(np.float32))
  m = coreset.random_projection(jax.random.key(0), 20, 5)
  np.testing.assert_allclose(np.asarray(coreset.project(x, m, block_size=64)),
                             np.matmul(np.asarray(x, np.float64), np.asarray(m, np.float64)).T,
                             rtol=1e-5, atol=1e-5)


def test_loop_compiles_once():
  features = jnp.asarray(_clustered(300, 8, seed=2))
  before = coreset._greedy_chunk._cache_size()
  for pct in (0.1, 0.2):
    coreset.approximate_greedy_coreset(features, percentage=pct, key=jax.random.key(0),
                                       projection_dim=4, chunk_size=13)
  # Different percentages and chunk bounds reuse one compilation per bank shape (+ selected size).
  assert coreset._greedy_chunk._cache_size() - before == 2


@pytest.mark.parametrize('n', [1, 7, 1000, 163856])
def test_first_argmax_matches_numpy_with_ties(n):
  rng = np.random.default_rng(n)
  x = rng.integers(0, 5, n).astype(np.float32)  # Many ties: the first maximum must win.
  x[rng.integers(0, n)] = 5.0
  x[rng.integers(0, n)] = 5.0
  assert int(jax.jit(coreset.first_argmax)(x)) == int(np.argmax(x))
  y = rng.normal(size=n).astype(np.float32)
  assert int(jax.jit(coreset.first_argmax)(y)) == int(np.argmax(y))


def test_squared_norms_match_numpy():
  x = np.random.default_rng(0).normal(size=(16, 333)).astype(np.float32)
  np.testing.assert_allclose(coreset.squared_norms(jnp.asarray(x)), (x * x).sum(0), rtol=1e-6)


def _full_pass_greedy(points_t, init_dist, num_samples):
  """One full pass per pick with the loop's own distance rounding (`block_distances`)."""
  norms = coreset.squared_norms(points_t)
  dist, selected = jnp.asarray(init_dist), []
  for _ in range(num_samples):
    i = int(np.argmax(np.asarray(dist)))
    selected.append(i)
    new = coreset.block_distances(points_t[:, i][None], norms[i][None], points_t, norms)[0]
    dist = jnp.minimum(dist, new)
  return np.array(selected)


@pytest.mark.parametrize('block_size,centre_chunk', [(64, 4), (256, 16), (1024, 16), (100, 3)])
def test_lazy_loop_picks_what_a_full_pass_picks(block_size, centre_chunk):
  # 3,000 clustered points: the lazy loop (blocks brought up to date only when they can hold the
  # maximum) must pick exactly what one pass over every point per pick picks.
  x = _clustered(3000, 16, seed=7)
  points_t = jnp.asarray(x.T)
  init = coreset.initial_distances(points_t, jax.random.key(2))
  ref = _full_pass_greedy(points_t, init, 150)
  ours = coreset.greedy_coreset_loop(points_t, init, num_samples=150, block_size=block_size,
                                     centre_chunk=centre_chunk)
  np.testing.assert_array_equal(np.asarray(ours), ref)


def test_lazy_loop_breaks_ties_by_first_index_and_never_picks_padding():
  # Small integer points with many exact duplicates: every distance is exact in float32, so ties
  # are real; like np.argmax, the first index must win (also once every distance is 0 and index 0
  # is picked again and again). 1,001 points in blocks of 64: the last block is mostly padding,
  # which must never be picked.
  rng = np.random.default_rng(0)
  x = rng.integers(0, 3, (1001, 4)).astype(np.float64)
  init = np.full(1001, 50.0)
  dist, ref = init.copy(), []
  for _ in range(1001):
    i = int(np.argmax(dist))
    ref.append(i)
    dist = np.minimum(dist, ((x - x[i]) ** 2).sum(1))
  ours = np.asarray(coreset.greedy_coreset_loop(
      jnp.asarray(x.T, jnp.float32), jnp.asarray(init, jnp.float32), num_samples=1001,
      block_size=64, centre_chunk=8))
  np.testing.assert_array_equal(ours, ref)
  assert ours.max() < 1001
  assert len({tuple(p) for p in x[ours[:81]]}) == 81  # The 3**4 distinct points come first.


def test_padded_projection_gives_the_same_coreset():
  x = _clustered(1500, 24, seed=3)
  m = coreset.random_projection(jax.random.key(0), 24, 8)
  plain = coreset.project(x, m)
  padded = coreset.project(x, m, pad_to=1024)
  assert plain.shape == (8, 1500) and padded.shape == (8, 2048)
  np.testing.assert_array_equal(np.asarray(padded[:, 1500:]), 0)
  init_plain = coreset.initial_distances(plain, jax.random.key(1))
  init_padded = coreset.initial_distances(padded, jax.random.key(1), num_points=1500)
  np.testing.assert_array_equal(np.asarray(init_plain), np.asarray(init_padded))
  np.testing.assert_array_equal(
      np.asarray(coreset.greedy_coreset_loop(plain, init_plain, num_samples=300)),
      np.asarray(coreset.greedy_coreset_loop(padded, init_padded, num_samples=300)))


def test_chunked_squared_norms_round_like_one_product():
  x = jnp.asarray(np.random.default_rng(1).normal(size=(24, 200003)).astype(np.float32))
  whole = jnp.dot(jnp.ones((24,)), x * x, precision='highest')
  np.testing.assert_array_equal(np.asarray(jax.jit(coreset.squared_norms)(x)), np.asarray(whole))
  small = coreset.squared_norms(x, chunk=1000)  # 201 chunks, the last overlapping.
  np.testing.assert_array_equal(np.asarray(small), np.asarray(whole))


@pytest.mark.parametrize('n, d, percentage, chunk_size', [(3000, 64, 0.1, None),
                                                          (2500, 32, 0.05, 40)])
def test_full_pass_picks_what_the_lazy_loop_picks(n, d, percentage, chunk_size):
  """The accelerator path (a full pass per pick, fixed trip count) forced on the CPU: the same
  points in the same order as the lazy blocks, chunked or not."""
  features = jnp.asarray(_clustered(n, d, seed=d))
  key = jax.random.key(5)
  lazy = coreset.approximate_greedy_coreset(features, percentage=percentage, key=key,
                                            chunk_size=chunk_size, method='lazy')
  full = coreset.approximate_greedy_coreset(features, percentage=percentage, key=key,
                                            chunk_size=chunk_size, method='full')
  np.testing.assert_array_equal(np.asarray(full), np.asarray(lazy))


def test_full_pass_has_no_data_dependent_loop():
  projected_t = jnp.asarray(np.random.default_rng(0).normal(size=(8, 200)).astype(np.float32))
  norms = coreset.squared_norms_jit(projected_t)
  state = coreset.initial_state(projected_t, norms, num_samples=10, block=200)
  jaxpr = jax.make_jaxpr(lambda s: coreset.full_greedy_chunk(
      projected_t, norms, s, 0, length=10, chunk=coreset.CENTRE_CHUNK, precision='highest'))(state)
  text = str(jaxpr)
  assert 'while' not in text and 'scan' in text
  lazy = jax.make_jaxpr(lambda s: coreset._greedy_chunk(  # pylint: disable=protected-access
      projected_t, norms, s, 0, 10, block=200, chunk=coreset.CENTRE_CHUNK,
      precision='highest'))(state)
  assert 'while' in str(lazy)  # What the full pass avoids on accelerators.


def test_auto_is_lazy_on_the_cpu_and_full_elsewhere():
  assert coreset.resolve_method('auto', 'cpu') == 'lazy'
  assert coreset.resolve_method('auto', 'gpu') == 'full'
  assert coreset.resolve_method('auto', 'tpu') == 'full'
  assert coreset.resolve_method('full', 'cpu') == 'full'
  with pytest.raises(ValueError, match='coreset method must be one of'):
    coreset.resolve_method('fast')
