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


@pytest.mark.parametrize('screen_dim', [8, 33, 49])
def test_screen_bound_is_below_every_distance(screen_dim):
  """q_term + key <= ||q - b||^2 for every pair (float64 truth), with principal directions that
  make it tight; screen_dim 49 keeps all 48 directions (residual 0)."""
  rng = np.random.default_rng(7)
  mix = rng.normal(size=(6, 48))
  bank_features = (np.matmul(rng.normal(size=(700, 6)), mix) + 0.3 * rng.normal(size=(700, 48)) + 2.0)
  queries = np.matmul(rng.normal(size=(90, 6)), mix) + 0.3 * rng.normal(size=(90, 48)) + 2.0
  bank = knn.prepare_bank(bank_features.astype(np.float32), block_size=32, screen=True,
                          screen_min_rows=0, screen_dim=screen_dim)
  assert bank.screen_t.shape[0] == min(screen_dim, 49)
  q32 = queries.astype(np.float32)
  q_screen, q_sq = knn.screen_vectors(jnp.asarray(q32), bank.screen_mean, bank.screen_basis)
  q_term = (1 - knn.SCREEN_SLACK) * q_sq
  dots = np.asarray(jnp.dot(q_screen.astype(jnp.bfloat16), bank.screen_t,
                            preferred_element_type=jnp.float32))
  bound = np.asarray(q_term)[:, None] + np.asarray(bank.screen_norm)[None, :700] - 2 * dots[:, :700]
  b32 = bank_features.astype(np.float32).astype(np.float64)
  truth = ((q32.astype(np.float64)[:, None] - b32[None]) ** 2).sum(-1)
  assert np.all(bound <= truth), (bound - truth).max()
  tightness = np.median(bound / truth)
  assert tightness > (0.95 if screen_dim == 8 else 0.98), tightness


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


@pytest.mark.parametrize('num_near,tier', [(2, 1), (8, 2), (40, 3)])
def test_screened_search_exact_on_near_duplicates(num_near, tier):
  """Rows closer together than the screen resolves (but float32 does): the fallback decides.

  With 3 candidates, 2 near-duplicate clusters leave at most N/64 queries uncertified (the
  smallest fallback, tier 1), 8 leave at most N/16 (tier 2), 40 more (every query searched
  again, tier 3). Either way the answer is the float64 nearest row.
  """
  rng = np.random.default_rng(5)
  d = 32
  bank_features = rng.normal(size=(600, d)).astype(np.float32)
  centres = rng.choice(600, num_near, replace=False)
  # Rows 600 + 6j .. 600 + 6j + 5 lie about 0.06 from row centres[j] (norms ~5.7): their
  # distances to a query 0.17 away differ by ~1e-2, far above float32's error (~1e-5) and below
  # the screen's slack (~0.5).
  for c in centres:
    near = bank_features[c] + 1e-2 * rng.normal(size=(6, d))
    bank_features = np.concatenate([bank_features, near.astype(np.float32)])
  queries = bank_features[centres][None] + 3e-2 * rng.normal(size=(1, num_near, d))
  queries = np.concatenate([queries, rng.normal(size=(1, 200, d))], axis=1).astype(np.float32)
  bank = _screened_bank(bank_features)
  flat = jnp.asarray(queries[0])
  n = flat.shape[0]
  _, _, certified = knn._screen_block(flat, bank, candidates=3)  # pylint: disable=protected-access
  failed = int(np.sum(~np.asarray(certified)))
  assert 1 + np.searchsorted([n // 64, n // 16], failed) == tier, (failed, n)
  dist, idx = knn.screened_nearest_neighbour(flat, bank, candidates=3)
  ref_d, ref_i = _brute(queries, bank_features, 1)
  np.testing.assert_array_equal(np.asarray(idx)[:, 0], ref_i[0, :, 0])
  # The fallback scan's ||q||^2 - 2 q.b + ||b||^2 carries float32 cancellation (~1e-6 ||q||^2).
  np.testing.assert_allclose(np.asarray(dist)[:, 0], ref_d[0, :, 0], rtol=1e-5, atol=2e-5)


def test_banks_without_low_dimensional_structure_keep_the_scan():
  rng = np.random.default_rng(8)
  noise = rng.normal(size=(700, 48)).astype(np.float32)
  assert not knn.uses_screen(knn.prepare_bank(noise, block_size=32, screen=True,
                                              screen_min_rows=0, screen_dim=17))
  structured = (np.matmul(rng.normal(size=(700, 6)), rng.normal(size=(6, 48)))
                + 0.01 * rng.normal(size=(700, 48))).astype(np.float32)
  assert knn.uses_screen(knn.prepare_bank(structured, block_size=32, screen=True,
                                          screen_min_rows=0, screen_dim=17))


def test_screened_search_scans_at_once_when_the_first_block_certifies_little():
  """A bank of tight near-duplicate clusters and queries inside them: the first block of queries
  certifies under SCREEN_MIN_CERTIFIED, so every query is scanned (the exact answer)."""
  rng = np.random.default_rng(9)
  d = 32
  centres = rng.normal(size=(100, d))
  bank_features = (np.repeat(centres, 7, axis=0) + 1e-2 * rng.normal(size=(700, d))).astype(
      np.float32)
  queries = (centres[rng.integers(0, 100, 300)] + 3e-2 * rng.normal(size=(300, d))).astype(
      np.float32)
  bank = _screened_bank(bank_features)
  flat = jnp.asarray(queries)
  _, _, certified = knn._screen_block(flat[:100], bank, candidates=3)  # pylint: disable=protected-access
  assert np.mean(np.asarray(certified)) < knn.SCREEN_MIN_CERTIFIED
  dist, idx = knn.screened_nearest_neighbour(flat, bank, candidates=3,
                                             max_block_floats=100 * bank.screen_t.shape[1])
  ref_d, ref_i = _brute(queries[None], bank_features, 1)
  np.testing.assert_array_equal(np.asarray(idx)[:, 0], ref_i[0, :, 0])
  # The scan's ||q||^2 - 2 q.b + ||b||^2 carries float32 cancellation (~1e-6 ||q||^2 ~ 3e-5).
  np.testing.assert_allclose(np.asarray(dist)[:, 0], ref_d[0, :, 0], rtol=1e-4, atol=5e-5)


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
      screen_t=bank.screen_t[:, :224], screen_norm=bank.screen_norm[:224],
      screen_basis=bank.screen_basis, screen_mean=bank.screen_mean)  # 7 blocks, made by hand.
  with pytest.raises(ValueError, match='at least 9 screen groups'):
    knn.screened_nearest_neighbour(flat, forced)
  assert not knn.uses_screen(knn.prepare_bank(bank_features, block_size=32, screen=True))  # < 4096
  _, idx = knn.batch_nearest_neighbours(jnp.asarray(queries), small)
  np.testing.assert_array_equal(np.asarray(idx), _brute(queries, bank_features[:200], 1)[1])


def test_auto_choices_per_backend():
  assert knn.resolve_block_size('auto', 'cpu') == 128
  assert knn.resolve_block_size('auto', 'gpu') == knn.ACCELERATOR_BLOCK_SIZE
  assert knn.resolve_block_size('auto', 'tpu') == knn.ACCELERATOR_BLOCK_SIZE
  assert knn.resolve_block_size(300, 'gpu') == 300
  assert knn.resolve_screen('auto', 'cpu') and not knn.resolve_screen('auto', 'gpu')
  assert knn.resolve_screen(True, 'gpu') and not knn.resolve_screen(False, 'cpu')
  for bad in (0, -3, 'big', True, 2.5):
    with pytest.raises(ValueError, match='block size'):
      knn.resolve_block_size(bad)
  with pytest.raises(ValueError, match='screen'):
    knn.resolve_screen('yes')
  assert [knn.screen_group_size(b) for b in (32, 128, 4096, 1000, 257)] == [32, 128, 128, 125, 1]


def test_accelerator_bank_gives_the_cpu_banks_answers():
  """The bank an accelerator prepares ('auto': 4096-row blocks, no screen), forced on the CPU,
  finds the same neighbours as the CPU's (128-row blocks, screened), at float32 rounding; and a
  screen forced on 4096-row blocks still screens (its groups do not follow the scan's blocks)."""
  rng = np.random.default_rng(11)
  d = 64
  basis = rng.normal(size=(12, d))
  bank_features = (np.matmul(rng.normal(size=(5000, 12)), basis)
                   + 0.02 * rng.normal(size=(5000, d))).astype(np.float32)
  queries = (np.matmul(rng.normal(size=(2, 100, 12)), basis)
             + 0.02 * rng.normal(size=(2, 100, d))).astype(np.float32)
  cpu = knn.prepare_bank(bank_features, block_size='auto', screen='auto', backend='cpu')
  gpu = knn.prepare_bank(bank_features, block_size='auto', screen='auto', backend='gpu')
  assert cpu.blocks.shape[1] == 128 and knn.uses_screen(cpu)
  assert gpu.blocks.shape[1] == 4096 and not knn.uses_screen(gpu)
  screened_large = knn.prepare_bank(bank_features, block_size=4096, screen=True)
  assert knn.uses_screen(screened_large)
  ref_d, ref_i = _brute(queries, bank_features, 1)
  for bank in (cpu, gpu, screened_large):
    dist, idx = knn.batch_nearest_neighbours(jnp.asarray(queries), bank)
    np.testing.assert_array_equal(np.asarray(idx), ref_i)
    np.testing.assert_allclose(np.asarray(dist), ref_d, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(
      np.asarray(knn.batch_nearest_neighbours(jnp.asarray(queries), gpu)[0]),
      np.asarray(knn.batch_nearest_neighbours(jnp.asarray(queries), cpu)[0]), rtol=1e-5)
  # (The scan's ||q||^2 - 2 q.b + ||b||^2 against the screen's sum((q - b)^2): a few ulps of the
  # norms, ~3e-6 relative here.)
