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


def _screened_bank(bank_features, block_size=32):
  bank = knn.prepare_bank(bank_features, block_size=block_size, screen=True, screen_min_rows=0)
  assert knn.uses_screen(bank)
  return bank


def test_screened_search_matches_brute_force():
  """The bfloat16 screen + float32 check returns the exact nearest row (float64 reference)."""
  queries, bank_features = _data(p=70, m=700, d=48, seed=3)
  bank = _screened_bank(bank_features)
  dist, idx = knn.batch_nearest_neighbours(jnp.asarray(queries), bank, k=1)
  ref_d, ref_i = _brute(queries, bank_features, 1)
  np.testing.assert_array_equal(np.asarray(idx), ref_i)
  np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-5)
  # The same answer as the float32 scan of an unscreened bank.
  plain = knn.prepare_bank(bank_features, block_size=32)
  np.testing.assert_array_equal(idx, knn.batch_nearest_neighbours(jnp.asarray(queries), plain)[1])


def test_screen_certifies_only_true_winners():
  """With one candidate many queries are left uncertified; every certified one is right."""
  queries, bank_features = _data(p=200, m=700, d=48, seed=4)
  bank = _screened_bank(bank_features)
  flat = jnp.asarray(queries.reshape(-1, 48))
  _, index, certified = knn._screen_block(flat, bank, candidates=1)  # pylint: disable=protected-access
  _, ref_i = _brute(queries.reshape(1, -1, 48), bank_features, 1)
  certified = np.asarray(certified)
  assert 0.2 < certified.mean() < 1.0, certified.mean()
  np.testing.assert_array_equal(np.asarray(index)[certified], ref_i[0, certified, 0])


@pytest.mark.parametrize('num_near', [2, 40])
def test_screened_search_exact_on_near_duplicates(num_near):
  """Rows closer together than bfloat16 resolves (but float32 does): the fallback decides.

  2 near-duplicate clusters leave a few queries uncertified (the per-query fallback); 40 leave
  more than N/16 (the full fallback). Either way the answer is the float64 nearest row.
  """
  rng = np.random.default_rng(5)
  d = 32
  bank_features = rng.normal(size=(600, d)).astype(np.float32)
  centres = rng.choice(600, num_near, replace=False)
  # Rows 600 + 6j .. 600 + 6j + 5 lie about 0.06 from row centres[j] (norms ~5.7): their
  # distances to a query 0.17 away differ by ~1e-2, far above float32's error (~1e-5) and far
  # below the bfloat16 screen's bound (~0.1).
  for c in centres:
    near = bank_features[c] + 1e-2 * rng.normal(size=(6, d))
    bank_features = np.concatenate([bank_features, near.astype(np.float32)])
  queries = bank_features[centres][None] + 3e-2 * rng.normal(size=(1, num_near, d))
  queries = np.concatenate([queries, rng.normal(size=(1, 60, d))], axis=1).astype(np.float32)
  bank = _screened_bank(bank_features)
  flat = jnp.asarray(queries[0])
  _, _, certified = knn._screen_block(flat, bank, candidates=2)  # pylint: disable=protected-access
  failed, few = int(np.sum(~np.asarray(certified))), flat.shape[0] // 16
  assert (1 <= failed <= few) if num_near == 2 else (failed > few), (failed, few)
  dist, idx = knn.screened_nearest_neighbour(flat, bank, candidates=2)
  ref_d, ref_i = _brute(queries, bank_features, 1)
  np.testing.assert_array_equal(np.asarray(idx)[:, 0], ref_i[0, :, 0])
  # The fallback scan's ||q||^2 - 2 q.b + ||b||^2 carries float32 cancellation (~1e-6 ||q||^2).
  np.testing.assert_allclose(np.asarray(dist)[:, 0], ref_d[0, :, 0], rtol=1e-5, atol=2e-5)


def test_screened_search_blocks_queries_and_small_banks_use_the_scan():
  queries, bank_features = _data(p=50, m=700, d=24, seed=6)
  bank = _screened_bank(bank_features)
  flat = jnp.asarray(queries.reshape(-1, 24))
  whole = knn.screened_nearest_neighbour(flat, bank)
  blocked = knn.screened_nearest_neighbour(flat, bank, max_block_floats=40 * 704)  # 40 per block
  np.testing.assert_array_equal(whole[1], blocked[1])
  np.testing.assert_array_equal(whole[0], blocked[0])
  small = knn.prepare_bank(bank_features[:200], block_size=32, screen=True, screen_min_rows=0)
  assert not knn.uses_screen(small)  # 7 blocks
  forced = knn.prepare_bank(bank_features[:200], block_size=32)._replace(
      screen_t=bank.screen_t[:, :224], screen_err=bank.screen_err[:224],
      screen_norm=bank.screen_norm[:224])  # A screening copy on 7 blocks, made by hand.
  with pytest.raises(ValueError, match='at least 9 bank blocks'):
    knn.screened_nearest_neighbour(flat, forced)
  assert not knn.uses_screen(knn.prepare_bank(bank_features, block_size=32, screen=True))  # < 4096
  _, idx = knn.batch_nearest_neighbours(jnp.asarray(queries), small)
  np.testing.assert_array_equal(np.asarray(idx), _brute(queries, bank_features[:200], 1)[1])
