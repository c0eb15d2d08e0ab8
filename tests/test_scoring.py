"""Scores and maps against scipy / torch / numpy references."""
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import ndimage
import torch
import torch.nn.functional as F

from patchcore_jax import knn
from patchcore_jax import scoring


@pytest.mark.parametrize('size,sigma', [(224, 4.0), (40, 4.0), (10, 4.0), (64, 1.5)])
def test_gaussian_matrix_matches_scipy(size, sigma):
  x = np.random.default_rng(0).normal(size=size)
  ref = ndimage.gaussian_filter1d(x, sigma=sigma, mode='reflect', truncate=4.0)
  np.testing.assert_allclose(np.matmul(scoring.gaussian_matrix(size, sigma=sigma), x), ref, atol=1e-6)


def test_anomaly_maps_match_official_segmentor():
  grid = np.random.default_rng(1).gamma(2.0, size=(3, 28, 28)).astype(np.float32)
  # Official RescaleSegmentor: torch bilinear (align_corners=False), then scipy gaussian_filter.
  up = F.interpolate(torch.from_numpy(grid)[:, None], size=224, mode='bilinear',
                     align_corners=False)[:, 0].numpy()
  ref = np.stack([ndimage.gaussian_filter(m, sigma=4) for m in up])
  ours = np.asarray(scoring.anomaly_maps(jnp.asarray(grid), size=(224, 224), sigma=4.0))
  np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


def test_patch_and_image_scores():
  sq = jnp.asarray([[[4.0, 16.0], [1.0, 9.0]]])  # [B=1, P=2, k=2]
  np.testing.assert_allclose(scoring.patch_scores(sq), [[10.0, 5.0]])
  np.testing.assert_allclose(scoring.patch_scores(sq, distance='l2'), [[3.0, 2.0]])
  np.testing.assert_allclose(scoring.image_scores(scoring.patch_scores(sq)), [10.0])
  with pytest.raises(ValueError):
    scoring.patch_scores(sq, distance='cosine')


def test_reweighting_matches_numpy_eq7():
  rng = np.random.default_rng(2)
  bank_features = rng.normal(size=(300, 16)).astype(np.float32)
  queries = rng.normal(size=(4, 30, 16)).astype(np.float32) * 1.5
  bank = knn.prepare_bank(bank_features, block_size=128)
  sq, idx = knn.batch_nearest_neighbours(jnp.asarray(queries), bank, k=1)
  scores = scoring.patch_scores(sq)
  ours = np.asarray(scoring.reweighted_image_scores(jnp.asarray(queries), scores, idx[..., 0], bank,
                                                    num_neighbours=9))
  for b in range(4):
    d_all = ((queries[b][:, None] - bank_features[None]) ** 2).sum(-1)
    worst = int(np.argmax(d_all.min(1)))
    s_star = d_all[worst].min()
    m_star = bank_features[int(np.argmin(d_all[worst]))]
    support = np.argsort(((bank_features - m_star) ** 2).sum(-1))[:9]
    dist = np.sqrt(((queries[b][worst] - bank_features[support]) ** 2).sum(-1)).astype(np.float64)
    weight = 1 - np.exp(dist[0]) / np.exp(dist).sum()
    np.testing.assert_allclose(ours[b], weight * s_star, rtol=1e-4)
  # The weight is in (0, 1): reweighted scores never exceed the plain maximum.
  assert (ours <= np.asarray(scores).max(1) + 1e-6).all()
