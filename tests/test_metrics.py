"""AUROC and AU-PRO on hand-computable cases and against independent implementations."""
import numpy as np
import pytest
from scipy import ndimage
from sklearn import metrics as sk

from patchcore_jax import metrics


def test_image_auroc():
  assert metrics.image_auroc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
  assert metrics.image_auroc([0, 0, 1, 1], [0.4, 0.3, 0.2, 0.1]) == 0.0
  assert metrics.image_auroc([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4]) == 0.75
  assert metrics.image_auroc([1, 1], [0.1, 0.2]) is None


def test_pixel_auroc_is_over_all_pixels():
  rng = np.random.default_rng(0)
  masks = rng.random((3, 8, 8)) > 0.8
  maps = rng.random((3, 8, 8)) + masks
  assert metrics.pixel_auroc(masks, maps) == pytest.approx(sk.roc_auc_score(masks.ravel(),
                                                                            maps.ravel()))


def test_perfect_and_inverted_maps():
  masks = np.zeros((2, 10, 10), bool)
  masks[0, 2:4, 2:4] = True
  masks[1, 6:9, 1:3] = True
  assert metrics.au_pro(masks, masks.astype(float)) == pytest.approx(1.0)
  assert metrics.au_pro(masks, -masks.astype(float)) == pytest.approx(0.0)


def test_hand_computed_pro_curve():
  # One 4-pixel region in a 1x8 image; scores make the curve step by hand-checkable amounts.
  masks = np.array([[[1, 1, 1, 1, 0, 0, 0, 0]]], bool)
  maps = np.array([[[8, 7, 2, 1, 6, 5, 4, 3]]], float)
  fprs, pros = metrics.pro_curve(masks, maps)
  # Descending thresholds 8,7 (region pixels), 6,5,4,3 (good), 2,1 (region).
  np.testing.assert_allclose(fprs, [0, 0, 0, .25, .5, .75, 1, 1, 1])
  np.testing.assert_allclose(pros, [0, .25, .5, .5, .5, .5, .5, .75, 1])
  # Up to FPR 0.3: PRO 0.5 over [0, 0.3] -> area 0.15 -> normalised 0.5.
  assert metrics.au_pro(masks, maps) == pytest.approx(0.5)


def test_regions_are_averaged_not_pixels():
  # A big region detected and a small one missed: PRO counts each region once.
  masks = np.zeros((1, 20, 20), bool)
  masks[0, :10, :10] = True  # 100 pixels, found.
  masks[0, 15, 15] = True  # 1 pixel, missed.
  maps = np.zeros((1, 20, 20))
  maps[0, :10, :10] = 1.0
  fprs, pros = metrics.pro_curve(masks, maps)
  assert pros[1] == pytest.approx(0.5)  # Above the top threshold: one of two regions fully.
  # Pixel-wise recall there would be 100/101. The next (last) threshold takes every pixel:
  # (fpr 1, PRO 1); the curve is linear in between, so PRO(0.3) = 0.65 and the normalised area
  # is 0.5 * (0.5 + 0.65) * 0.3 / 0.3 = 0.575.
  assert metrics.au_pro(masks, maps) == pytest.approx(0.575)


def test_diagonal_pixels_form_one_region():
  masks = np.zeros((1, 5, 5), bool)
  masks[0, 1, 1] = masks[0, 2, 2] = True  # 8-connected: one region of two pixels.
  maps = np.zeros((1, 5, 5))
  maps[0, 1, 1] = 1.0  # Half of the single region.
  _, pros = metrics.pro_curve(masks, maps)
  assert pros[1] == pytest.approx(0.5)


def _reference_au_pro(masks, maps, limit=0.3, steps=20001):
  """Independent: sweep many thresholds, then integrate the (fpr, pro) curve up to `limit`."""
  labels = [ndimage.label(m, np.ones((3, 3)))[0] for m in masks]
  good = ~masks
  thresholds = np.quantile(maps, np.linspace(1, 0, steps))
  fprs, pros = [0.0], [0.0]
  regions = [(i, r) for i, lab in enumerate(labels) for r in range(1, lab.max() + 1)]
  for t in thresholds:
    above = maps >= t
    fprs.append((above & good).sum() / good.sum())
    pros.append(np.mean([above[i][labels[i] == r].mean() for i, r in regions]))
  fprs, pros = np.array(fprs), np.array(pros)
  keep = fprs <= limit
  x = np.append(fprs[keep], limit)
  y = np.append(pros[keep], np.interp(limit, fprs, pros))
  return np.trapezoid(y, x) / limit


def test_matches_threshold_sweep_on_random_maps():
  rng = np.random.default_rng(3)
  masks = np.zeros((4, 32, 32), bool)
  masks[0, 3:9, 4:12] = True
  masks[1, 20:30, 20:23] = True
  masks[1, 2:4, 2:4] = True
  maps = ndimage.gaussian_filter(rng.random((4, 32, 32)), (0, 2, 2)) + 0.3 * masks
  assert metrics.au_pro(masks, maps) == pytest.approx(_reference_au_pro(masks, maps), abs=2e-3)


def test_no_regions():
  assert metrics.au_pro(np.zeros((2, 4, 4), bool), np.zeros((2, 4, 4))) is None


def test_trapezoid_interpolates_at_limit():
  assert metrics.trapezoid([0, 1], [0, 1], x_max=0.5) == pytest.approx(0.125)
  assert metrics.trapezoid([0, 0.5, 1], [1, 1, 1], x_max=0.5) == pytest.approx(0.5)


def test_f1_optimal_threshold_against_sklearn_on_every_cut():
  rng = np.random.default_rng(1)
  labels = rng.random(400) < 0.3
  scores = np.round(rng.normal(size=400) + 1.2 * labels, 1)  # Many ties.
  threshold, f1 = metrics.f1_optimal_threshold(labels, scores)
  cuts = np.unique(scores)
  best = max(sk.f1_score(labels, scores >= c) for c in cuts)
  assert f1 == pytest.approx(best) and sk.f1_score(labels, scores > threshold) == pytest.approx(f1)
  # Halfway between two distinct scores, so equal scores decide as on this data.
  assert not np.any(scores == threshold)
  below, above = scores[scores < threshold].max(), scores[scores > threshold].min()
  assert threshold == pytest.approx(0.5 * (below + above))
  # Every image called anomalous: the threshold sits just below the lowest score.
  threshold, f1 = metrics.f1_optimal_threshold([1, 1, 0], [0.5, 0.7, 0.6])
  assert f1 == pytest.approx(0.8) and threshold < 0.5
  assert metrics.f1_optimal_threshold([0, 0], [0.1, 0.2]) == (None, None)
