"""IVF-PQ in JAX against numpy: k-means steps, codes, asymmetric distances, recall; faiss's
IndexIVFPQ (when installed) for the recall at equal parameters."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax import ivfpq


def _clustered(n, d, seed, centres=32, noise=1.0):
  rng = np.random.default_rng(seed)
  c = rng.normal(size=(centres, d)).astype(np.float32) * 5
  return (c[rng.integers(0, centres, n)] + noise * rng.normal(size=(n, d))).astype(np.float32)


def _numpy_kmeans(x, start, iterations):
  c = start.astype(np.float64)
  for _ in range(iterations):
    labels = np.argmin(((x[:, None] - c[None]) ** 2).sum(-1), 1)
    for j in range(len(c)):
      if np.any(labels == j):
        c[j] = x[labels == j].mean(0)
  return c


def test_kmeans_matches_lloyd_in_numpy():
  x = _clustered(600, 8, seed=0, centres=6)
  key = jax.random.key(1)
  got = np.asarray(ivfpq.kmeans(jnp.asarray(x), k=6, key=key, iterations=5, block_size=128))
  start = x[np.asarray(jax.random.permutation(key, 600))[:6]]
  np.testing.assert_allclose(got, _numpy_kmeans(x, start, 5), rtol=1e-4, atol=1e-4)
  groups = jnp.asarray(np.stack([x, x[::-1]]))  # Two groups at once, as the codebooks are trained.
  both = np.asarray(ivfpq.group_kmeans(groups, k=6, key=key, iterations=5, block_size=100))
  assert both.shape == (2, 6, 8)
  for g in range(2):
    gstart = np.asarray(groups[g])[np.asarray(jax.random.permutation(
        jax.random.split(key, 2)[g], 600))[:6]]
    np.testing.assert_allclose(both[g], _numpy_kmeans(np.asarray(groups[g]), gstart, 5),
                               rtol=1e-4, atol=1e-4)


def _reference_search(index, queries, nprobe):
  """Brute-force ADC in numpy: decode every row of the probed lists, nearest by ||q - x_hat||."""
  coarse, books = np.asarray(index.coarse, np.float64), np.asarray(index.codebooks, np.float64)
  codes, ids = np.asarray(index.codes), np.asarray(index.ids)
  m = books.shape[0]
  dist, rows = [], []
  for q in np.asarray(queries, np.float64):
    probes = np.argsort(((coarse - q) ** 2).sum(1), kind='stable')[:nprobe]
    best = (np.inf, -1)
    for p in probes:
      for slot in np.nonzero(ids[p] >= 0)[0]:
        x_hat = coarse[p] + np.concatenate([books[j, codes[p, slot, j]] for j in range(m)])
        best = min(best, (((q - x_hat) ** 2).sum(), ids[p, slot]))
    dist.append(best[0])
    rows.append(best[1])
  return np.array(dist), np.array(rows)


def test_index_files_every_row_once_and_search_is_the_adc_minimum():
  bank = _clustered(3000, 16, seed=2)
  index = ivfpq.build(bank, nlist=16, subquantizers=4, key=jax.random.key(0), iterations=8,
                      block_size=512)
  ids = np.asarray(index.ids)
  assert sorted(ids[ids >= 0].tolist()) == list(range(3000)) and index.size == 3000
  # Codes: each sub-vector's nearest codeword of the row's residual.
  cells = np.asarray(ivfpq.assign(jnp.asarray(bank), index.coarse))
  p, slot = np.argwhere(ids == 123)[0]
  assert cells[123] == p
  residual = (bank[123] - np.asarray(index.coarse)[p]).reshape(4, 4)
  books = np.asarray(index.codebooks)
  expected = [np.argmin(((books[j] - residual[j]) ** 2).sum(1)) for j in range(4)]
  assert np.asarray(index.codes)[p, slot].tolist() == expected
  queries = _clustered(40, 16, seed=3)
  for nprobe in (1, 3):
    dist, rows = ivfpq.search(jnp.asarray(queries), index, nprobe=nprobe, block_size=16)
    ref_dist, ref_rows = _reference_search(index, queries, nprobe)
    np.testing.assert_allclose(np.asarray(dist)[:, 0], ref_dist, rtol=2e-4, atol=1e-3)
    assert np.mean(np.asarray(rows)[:, 0] == ref_rows) >= 0.95  # Ties may pick another row.
  dist3, rows3 = ivfpq.search(jnp.asarray(queries), index, nprobe=3, k=3)
  assert np.all(np.diff(np.asarray(dist3), axis=1) >= 0) and rows3.shape == (40, 3)


def test_recall_grows_with_nprobe_and_is_high_on_well_separated_data():
  bank = _clustered(4000, 32, seed=4, centres=64, noise=0.3)
  queries = bank[::40] + 0.01 * np.random.default_rng(5).normal(size=(100, 32)).astype(np.float32)
  exact = np.argmin(((queries[:, None] - bank[None]) ** 2).sum(-1), 1)
  index = ivfpq.build(bank, nlist=32, subquantizers=8, key=jax.random.key(1))
  recalls = [ivfpq.recall_at_1(ivfpq.search(jnp.asarray(queries), index, nprobe=n)[1], exact)
             for n in (1, 4, 32)]
  assert recalls[0] <= recalls[1] <= recalls[2] and recalls[2] >= 0.9


@pytest.mark.skipif(importlib.util.find_spec('faiss') is None, reason='faiss is not installed')
def test_recall_as_faiss_at_equal_parameters():
  import faiss  # pylint: disable=g-import-not-at-top
  bank = _clustered(8000, 64, seed=6, centres=200, noise=1.0)
  queries = _clustered(300, 64, seed=7, centres=200, noise=1.0)
  exact = np.argmin(((queries[:, None] - bank[None]) ** 2).sum(-1), 1)
  index = ivfpq.build(bank, nlist=64, subquantizers=16, key=jax.random.key(2))
  reference = faiss.IndexIVFPQ(faiss.IndexFlatL2(64), 64, 64, 16, 8)
  reference.train(bank)
  reference.add(bank)
  for nprobe in (1, 8):
    reference.nprobe = nprobe
    ours = ivfpq.recall_at_1(ivfpq.search(jnp.asarray(queries), index, nprobe=nprobe)[1], exact)
    theirs = ivfpq.recall_at_1(reference.search(queries, 1)[1], exact)
    assert abs(ours - theirs) <= 0.08, (nprobe, ours, theirs)


def test_bad_parameters_are_refused():
  with pytest.raises(ValueError, match='not divisible'):
    ivfpq.build(np.zeros((600, 10), np.float32), nlist=4, subquantizers=3, key=jax.random.key(0))
  with pytest.raises(ValueError, match='too few'):
    ivfpq.build(np.zeros((100, 8), np.float32), nlist=4, subquantizers=2, key=jax.random.key(0))
