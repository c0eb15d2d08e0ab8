"""Blocked kNN against brute-force numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax import knn


def _data(p=50, m=333, d=24, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(3, p, d)).astype(np.float32),
          rng.normal(size=(m, d)).astype(np.float32))


def _brute(queries, bank, k):
  d = ((queries[..., None, :].astype(np.float64) - bank[None, None].astype(np.float64)) ** 2).sum(-1)
  idx = np.argsort(d, axis=-1, kind='stable')[..., :k]
  return np.take_along_axis(d, idx, -1), idx


@pytest.mark.parametrize('k,block_size', [(1, 64), (1, 1000), (3, 64), (5, 100)])
def test_matches_brute_force(k, block_size):
  queries, bank_features = _data()
  bank = knn.prepare_bank(bank_features, block_size=block_size)
  assert bank.size == 333
  dist, idx = knn.batch_nearest_neighbours(jnp.asarray(queries), bank, k=k)
  ref_d, ref_i = _brute(queries, bank_features, k)
  np.testing.assert_array_equal(np.asarray(idx), ref_i)
  np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-4, atol=1e-4)


def test_squared_distances_clamped_and_exact_on_duplicates():
  x = np.random.default_rng(1).normal(size=(20, 8)).astype(np.float32) * 100
  d = np.asarray(knn.squared_distances(jnp.asarray(x), jnp.asarray(x)))
  assert (d >= 0).all()
  bank = knn.prepare_bank(x, block_size=7)
  dist, idx = knn.nearest_neighbours(jnp.asarray(x), bank)
  np.testing.assert_array_equal(np.asarray(idx[:, 0]), np.arange(20))
  assert np.asarray(dist).max() < 1e-1  # Cancellation error only, never negative.


def test_padding_rows_never_win():
  # Queries at the origin would pick zero padding rows if they were not masked.
  bank_features = np.full((5, 4), 3.0, np.float32)
  bank = knn.prepare_bank(bank_features, block_size=4)  # 8 rows, 3 of them padding.
  dist, idx = knn.nearest_neighbours(jnp.zeros((2, 4)), bank, k=2)
  assert np.asarray(idx).max() < 5
  np.testing.assert_allclose(np.asarray(dist), 36.0)


def test_compiles_once_per_shape():
  queries, bank_features = _data(p=17, m=99)  # Shapes no other test uses.
  bank = knn.prepare_bank(bank_features, block_size=64)
  before = knn.batch_nearest_neighbours._cache_size()
  for _ in range(3):
    knn.batch_nearest_neighbours(jnp.asarray(queries), bank, k=1)
  assert knn.batch_nearest_neighbours._cache_size() - before == 1


def test_explicit_precision_is_in_the_program():
  queries, bank_features = _data()
  bank = knn.prepare_bank(bank_features, block_size=64)
  text = jax.jit(lambda q: knn.nearest_neighbours(q, bank)).lower(jnp.asarray(queries[0])).as_text()
  assert 'HIGHEST' in text.upper()


def test_first_argmin_rows_matches_numpy_with_ties():
  rng = np.random.default_rng(0)
  d = rng.integers(0, 4, (50, 77)).astype(np.float32)  # Many ties: the first minimum must win.
  d[3] = np.inf
  d[3, 40] = 2.0
  low, idx = jax.jit(knn.first_argmin_rows)(d)
  np.testing.assert_array_equal(np.asarray(idx), np.argmin(d, axis=1))
  np.testing.assert_array_equal(np.asarray(low), d.min(axis=1))


def test_ties_across_blocks_keep_the_first_row():
  bank_features = np.zeros((10, 4), np.float32)  # All rows equal: row 0 is the nearest.
  bank = knn.prepare_bank(bank_features, block_size=3)
  _, idx = knn.nearest_neighbours(jnp.ones((2, 4)), bank)
  np.testing.assert_array_equal(np.asarray(idx), 0)
