"""MahalanobisAD, PaDiM and SPADE against numpy / scikit-learn references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
from sklearn import covariance

from patchcore_jax import baselines


def _mahalanobis_np(x, mean, cov):
  c = (x - mean).astype(np.float64)
  return np.sqrt(np.einsum('...i,...ij,...j->...', c, np.linalg.inv(cov), c))


@pytest.mark.parametrize('n, d', [(40, 8), (12, 30)])  # More and fewer samples than dimensions.
def test_ledoit_wolf_matches_scikit_learn(n, d):
  x = np.random.default_rng(0).normal(size=(n, d)).astype(np.float32) * np.linspace(0.5, 3, d)
  ours = np.asarray(baselines.ledoit_wolf(jnp.asarray(x)))
  ref = covariance.LedoitWolf().fit(x.astype(np.float64)).covariance_
  np.testing.assert_allclose(ours, ref, rtol=2e-4, atol=2e-5)


def test_mahalanobis_ad_matches_numpy():
  rng = np.random.default_rng(1)
  train = [rng.normal(size=(30, 6)).astype(np.float32),
           (rng.normal(size=(30, 10)) * 2 + 1).astype(np.float32)]
  test = [rng.normal(size=(5, 6)).astype(np.float32),
          (rng.normal(size=(5, 10)) * 3).astype(np.float32)]
  model = baselines.mahalanobis_fit([jnp.asarray(x) for x in train])
  ours = np.asarray(baselines.mahalanobis_scores(model, [jnp.asarray(x) for x in test]))
  ref = sum(_mahalanobis_np(t, x.mean(0), covariance.LedoitWolf().fit(x.astype(np.float64)).covariance_)
            for x, t in zip(train, test))
  np.testing.assert_allclose(ours, ref, rtol=1e-4)
  pooled = baselines.pool([jnp.ones((2, 3, 4, 5)) * jnp.arange(5.0)])
  np.testing.assert_allclose(np.asarray(pooled[0]), np.tile(np.arange(5.0), (2, 1)))


def test_padim_matches_numpy():
  rng = np.random.default_rng(2)
  maps = [rng.normal(size=(12, 8, 8, 4)).astype(np.float32),
          rng.normal(size=(12, 4, 4, 6)).astype(np.float32),
          rng.normal(size=(12, 2, 2, 5)).astype(np.float32)]
  emb = np.asarray(baselines.padim_embedding([jnp.asarray(m) for m in maps]))
  assert emb.shape == (12, 8, 8, 15)
  np.testing.assert_array_equal(emb[:, 5, 3, 4:10], maps[1][:, 2, 1])  # The covering cell.
  np.testing.assert_array_equal(emb[:, 7, 0, 10:], maps[2][:, 1, 0])
  channels = baselines.padim_channels(jax.random.key(0), 15, 7)
  assert len(set(np.asarray(channels).tolist())) == 7
  train, test = emb[:10], emb[10:]
  model = baselines.padim_fit(jnp.asarray(train), channels)
  ours = np.asarray(baselines.padim_scores(model, jnp.asarray(test)))
  kept = np.asarray(channels)
  ref = np.zeros((2, 8, 8))
  for i in range(8):
    for j in range(8):
      x = train[:, i, j, kept].astype(np.float64)
      cov = np.cov(x, rowvar=False) + 0.01 * np.eye(7)
      ref[:, i, j] = _mahalanobis_np(test[:, i, j, kept], x.mean(0), cov)
  np.testing.assert_allclose(ours, ref, rtol=1e-3, atol=1e-4)
  with pytest.raises(ValueError, match='does not divide'):
    baselines.padim_embedding([jnp.zeros((1, 8, 8, 1)), jnp.zeros((1, 3, 3, 1))])
  with pytest.raises(ValueError, match='0 < d <= 15'):
    baselines.padim_channels(jax.random.key(0), 15, 16)


def test_spade_matches_brute_force():
  rng = np.random.default_rng(3)
  train_pooled = rng.normal(size=(9, 5)).astype(np.float32)
  test_pooled = rng.normal(size=(3, 5)).astype(np.float32)
  scores, index = baselines.spade_image_scores(jnp.asarray(train_pooled),
                                               jnp.asarray(test_pooled), k=4)
  d = np.linalg.norm(test_pooled[:, None].astype(np.float64) - train_pooled[None], axis=-1)
  order = np.argsort(d, axis=1)[:, :4]
  np.testing.assert_array_equal(np.asarray(index), order)
  np.testing.assert_allclose(np.asarray(scores), np.take_along_axis(d, order, 1).mean(1),
                             rtol=1e-5)
  train_pyr = rng.normal(size=(9, 4, 4, 6)).astype(np.float32)
  test_pyr = rng.normal(size=(3, 4, 4, 6)).astype(np.float32)
  for top in (1, 3):
    ours = np.asarray(baselines.spade_pixel_scores(jnp.asarray(train_pyr), jnp.asarray(test_pyr),
                                                   index, top=top))
    for b in range(3):
      gallery = train_pyr[order[b]].reshape(-1, 6).astype(np.float64)
      dist = np.linalg.norm(test_pyr[b].reshape(-1, 1, 6) - gallery[None], axis=-1)
      ref = np.sort(dist, axis=1)[:, :top].mean(1).reshape(4, 4)
      np.testing.assert_allclose(ours[b], ref, rtol=1e-4, atol=1e-5)
  pyramid = baselines.spade_pyramid([jnp.asarray(train_pyr), jnp.ones((9, 2, 2, 3))])
  assert pyramid.shape == (9, 4, 4, 9)


def test_maps_are_upsampled_smoothed_and_maxed():
  grid = np.random.default_rng(4).random((2, 7, 7)).astype(np.float32)
  maps, scores = baselines.maps_and_scores(jnp.asarray(grid), size=(28, 28))
  up = np.asarray(jax.image.resize(jnp.asarray(grid), (2, 28, 28), 'bilinear', antialias=False))
  ref = np.stack([ndimage.gaussian_filter(u.astype(np.float64), 4.0) for u in up])
  np.testing.assert_allclose(np.asarray(maps), ref, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(np.asarray(scores), ref.max(axis=(1, 2)), rtol=1e-4)
