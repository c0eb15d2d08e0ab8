"""Image AUROC, pixel AUROC and AU-PRO (MVTec AD's definition). Host-side numpy."""
import bisect

import numpy as np
from scipy import ndimage
from sklearn import metrics as sk_metrics


def image_auroc(labels, scores):
  """labels: [N] 0 good / 1 anomalous; scores: [N] -> ROC AUC, or None with one class only."""
  labels = np.asarray(labels)
  if labels.min() == labels.max():
    return None
  return float(sk_metrics.roc_auc_score(labels, np.asarray(scores)))


def pixel_auroc(masks, maps):
  """masks: [N, H, W] bool ground truth; maps: [N, H, W] scores -> ROC AUC over all pixels."""
  masks = np.asarray(masks).ravel()
  if masks.min() == masks.max():
    return None
  return float(sk_metrics.roc_auc_score(masks, np.asarray(maps, np.float32).ravel()))


def pro_curve(masks, maps):
  """The per-region overlap curve of MVTec AD's evaluation code.

  Regions are 8-connected components of each ground-truth mask. Walking down the sorted scores,
  the false-positive rate counts good pixels of all images; the PRO averages, over all regions of
  all images, the fraction of each region above the threshold. Tied scores are one threshold.

  Args:
    masks: [N, H, W] bool ground truth (good images: all False).
    maps: [N, H, W] anomaly scores.
  Returns:
    (fprs, pros): ascending float64 arrays starting at 0.
  """
  masks = np.asarray(masks, bool)
  maps = np.asarray(maps)
  structure = np.ones((3, 3), dtype=int)
  fp_changes = np.zeros(masks.shape, np.uint32)
  pro_changes = np.zeros(masks.shape, np.float64)
  num_ok_pixels = 0
  num_regions = 0
  for i, mask in enumerate(masks):
    labeled, n = ndimage.label(mask, structure)
    num_regions += n
    ok = labeled == 0
    num_ok_pixels += int(ok.sum())
    fp_changes[i, ok] = 1
    if n:
      sizes = np.bincount(labeled.ravel(), minlength=n + 1).astype(np.float64)
      pro_changes[i][~ok] = 1.0 / sizes[labeled[~ok]]
  if num_regions == 0 or num_ok_pixels == 0:
    raise ValueError('AU-PRO needs at least one defect region and one good pixel')
  scores = maps.ravel()
  order = np.argsort(scores, kind='stable')[::-1]
  scores = scores[order]
  fprs = np.cumsum(fp_changes.ravel()[order], dtype=np.float64) / num_ok_pixels
  pros = np.cumsum(pro_changes.ravel()[order], dtype=np.float64) / num_regions
  keep = np.append(np.diff(scores) != 0, True)
  fprs = np.clip(fprs[keep], None, 1.0)
  pros = np.clip(pros[keep], None, 1.0)
  return np.concatenate(([0.0], fprs)), np.concatenate(([0.0], pros))


def trapezoid(x, y, x_max=None):
  """Area under y(x) by the trapezoid rule up to `x_max`, interpolating linearly at `x_max`."""
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  finite = np.isfinite(x) & np.isfinite(y)
  x, y = x[finite], y[finite]
  correction = 0.0
  if x_max is not None:
    if x_max not in x:
      ins = bisect.bisect(x, x_max)
      if not 0 < ins < len(x):
        raise ValueError(f'x_max={x_max} outside the curve\'s range [{x[0]}, {x[-1]}]')
      y_interp = y[ins - 1] + (y[ins] - y[ins - 1]) * (x_max - x[ins - 1]) / (x[ins] - x[ins - 1])
      correction = 0.5 * (y_interp + y[ins - 1]) * (x_max - x[ins - 1])
    keep = x <= x_max
    x, y = x[keep], y[keep]
  return float(np.sum(0.5 * (y[1:] + y[:-1]) * (x[1:] - x[:-1])) + correction)


def au_pro(masks, maps, *, fpr_limit=0.3):
  """Area under the PRO curve up to `fpr_limit`, divided by `fpr_limit` (in [0, 1]).

  None when there is no defect region.
  """
  if not np.asarray(masks).any():
    return None
  fprs, pros = pro_curve(masks, maps)
  return trapezoid(fprs, pros, x_max=fpr_limit) / fpr_limit


def f1_optimal_threshold(labels, scores):
  """The threshold maximising F1 for the decision `score > threshold`.

  Args:
    labels: [...] bool/0-1 ground truth (images or pixels).
    scores: [...] scores of the same shape.
  Returns:
    (threshold, f1): the threshold lies halfway between the lowest score still called anomalous
    and the next lower distinct score (below every score if all are called anomalous), so new
    scores equal to either side are decided as on this data. None, None with one class only.
  """
  labels = np.asarray(labels).ravel().astype(bool)
  scores = np.asarray(scores).ravel()
  positives = int(labels.sum())
  if positives == 0 or positives == labels.size:
    return None, None
  order = np.argsort(-scores, kind='stable')
  ranked = scores[order]
  hits = labels[order]
  del order
  tp = np.cumsum(hits, dtype=np.int64)
  fp = np.arange(1, hits.size + 1, dtype=np.int64) - tp
  last = np.append(ranked[1:] != ranked[:-1], True)  # The last of each run of equal scores.
  tp, fp, ranked = tp[last], fp[last], ranked[last]
  f1 = 2.0 * tp / (tp + fp + positives)
  best = int(np.argmax(f1))
  low = float(ranked[best])
  if best + 1 < ranked.size:
    threshold = 0.5 * (low + float(ranked[best + 1]))
  else:
    threshold = float(np.nextafter(np.float32(low), np.float32(-np.inf)))
  return threshold, float(f1[best])
