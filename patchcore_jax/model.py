"""The fitted model and its records: `Settings`, `Calibration`, `PatchCore`, `Prediction`.

Calibration. A threshold turns scores into decisions: an image is anomalous when its score is
above `image_threshold`. It comes from good images held out of the fit (`holdout`, the
inspection setting: with n held-out scores and `target_fpr`, the threshold is the (m+1)-th
largest score, m = floor(target_fpr * n), so at most m of them, a fraction <= target_fpr, lie
above it: `holdout_threshold`), from labelled test data (the F1-optimal threshold:
`evaluation.calibrate_on_test`), or is set by hand (`with_threshold`). Normalised scores are
score / (2 * threshold): 0.5 at the threshold, 0 for a perfect match, linear in between and
above. Maps are coloured on the fixed scale [0, 2 * threshold] (the normalised map's [0, 1]),
never by a batch's own range.
"""
import dataclasses
from typing import Any, Mapping, NamedTuple, Optional, Tuple

from flax import struct
import numpy as np

from patchcore_jax import backbones as backbones_lib
from patchcore_jax import coreset as coreset_lib
from patchcore_jax import errors
from patchcore_jax import knn
from patchcore_jax import scoring
from patchcore_jax.data import transforms
from patchcore_jax.version import __version__


@dataclasses.dataclass(frozen=True)
class Settings:
  """Every hyperparameter of a fitted model (the defaults are the paper's and official code's)."""
  # Preprocessing (data.transforms): shorter side to `resize`, centre crop `image_size`
  # ('resize_crop'), or straight to image_size squared ('resize').
  transform: str = 'resize_crop'
  resize: int = 256
  image_size: int = 224
  # Patch features (features.patch_features).
  patch_size: int = 3
  stride: int = 1
  pretrain_dim: int = 1024
  target_dim: int = 1024
  # Memory bank (coreset.approximate_greedy_coreset); seed makes the projection and starts.
  percentage: float = 0.1
  projection_dim: int = 128
  num_starts: int = 10
  seed: int = 0
  # The greedy loop: 'auto' (lazy blocks on the CPU, a full pass per pick on accelerators),
  # 'lazy' or 'full'; the same picks (coreset.resolve_method).
  coreset_method: str = 'auto'
  # Search and scoring (knn, scoring).
  k: int = 1
  # Scan block rows and the bfloat16 screen: 'auto' picks per backend when the bank is prepared
  # (knn.resolve_block_size, knn.resolve_screen); else a positive int and True/False.
  block_size: Any = 'auto'
  precision: str = 'highest'
  screen: Any = 'auto'
  distance: str = 'squared_l2'
  sigma: float = 4.0
  reweight: bool = False
  reweight_neighbours: int = 9
  batch_size: int = 8  # Images per compiled call.

  @property
  def image_config(self):
    return dict(resize=self.resize, image_size=self.image_size, transform=self.transform)

  @property
  def feature_config(self):
    return dict(patch_size=self.patch_size, stride=self.stride, pretrain_dim=self.pretrain_dim,
                target_dim=self.target_dim)

  @property
  def score_config(self):
    return dict(image_size=self.image_size, k=self.k, distance=self.distance, sigma=self.sigma,
                reweight=self.reweight, reweight_neighbours=self.reweight_neighbours,
                precision=self.precision)

  def validate(self, *, names: Optional[Mapping[str, str]] = None):
    """Raises errors.UserError naming the first field with a value out of range; `names` maps a
    field to how messages name it (the jobs pass their config fields). Returns self."""
    label = lambda field: (names or {}).get(field, field)
    checks = [
        ('transform', self.transform in transforms.TRANSFORMS, f'one of {transforms.TRANSFORMS}'),
        ('image_size', self.image_size >= 16, 'at least 16'),
        ('resize', self.resize >= 1, 'positive'),
        ('patch_size', self.patch_size >= 1, 'positive'),
        ('stride', self.stride >= 1, 'positive'),
        ('pretrain_dim', self.pretrain_dim >= 1, 'positive'),
        ('target_dim', self.target_dim >= 1, 'positive'),
        ('percentage', 0.0 < self.percentage <= 1.0, 'in (0, 1]'),
        ('projection_dim', self.projection_dim >= 1, 'positive'),
        ('num_starts', self.num_starts >= 1, 'positive'),
        ('k', self.k >= 1, 'at least 1'),
        ('block_size', self.block_size == 'auto' or (
            isinstance(self.block_size, int) and not isinstance(self.block_size, bool)
            and self.block_size >= 1), "a positive integer or 'auto'"),
        ('screen', self.screen == 'auto' or isinstance(self.screen, bool),
         "True, False or 'auto'"),
        ('coreset_method', self.coreset_method in coreset_lib.METHODS,
         f'one of {coreset_lib.METHODS}'),
        ('precision', self.precision in ('default', 'high', 'highest'),
         "one of ('default', 'high', 'highest')"),
        ('distance', self.distance in scoring.DISTANCES, f'one of {scoring.DISTANCES}'),
        ('sigma', self.sigma >= 0, 'non-negative'),
        ('reweight_neighbours', self.reweight_neighbours >= 1, 'at least 1'),
        ('batch_size', self.batch_size >= 1, 'at least 1'),
    ]
    for field, ok, allowed in checks:
      if not ok:
        raise errors.UserError(f'{label(field)} = {getattr(self, field)!r} is not allowed: must '
                               f'be {allowed}')
    if self.transform == 'resize_crop' and self.image_size > self.resize:
      raise errors.UserError(
          f'{label("image_size")} = {self.image_size} is larger than {label("resize")} = '
          f'{self.resize}: the centre crop would pad the image with black borders; make resize '
          '>= image_size')
    return self


@dataclasses.dataclass(frozen=True)
class Calibration:
  """Thresholds and where they came from (see the module docstring).

  image_threshold: an image is anomalous when its score is above this (None: no decisions).
  image_threshold_source: 'holdout', 'test_f1', 'manual' or 'none'.
  pixel_threshold: a map pixel is defective above this (binary masks); the F1-optimal pixel
    threshold on labelled test data when there was one, else `image_threshold`.
  pixel_threshold_source: as image_threshold_source.
  holdout_scores: scores of the held-out good images, ascending.
  target_fpr: the false-positive rate the holdout threshold was chosen for.
  test: (name, value) pairs measured on labelled test data: f1_image_threshold, image_f1,
    misclassified (test images on the wrong side of f1_image_threshold), f1_pixel_threshold,
    pixel_f1.
  """
  image_threshold: Optional[float] = None
  image_threshold_source: str = 'none'
  pixel_threshold: Optional[float] = None
  pixel_threshold_source: str = 'none'
  holdout_scores: Tuple[float, ...] = ()
  target_fpr: Optional[float] = None
  test: Tuple[Tuple[str, Any], ...] = ()

  @property
  def color_range(self):
    """(vmin, vmax) of the map colours: [0, 2 * image_threshold], or None without a threshold."""
    if self.image_threshold is None:
      return None
    return 0.0, 2.0 * self.image_threshold

  def to_dict(self):
    out = dataclasses.asdict(self)
    out['holdout_scores'] = list(self.holdout_scores)
    out['test'] = dict(self.test)
    return out

  @classmethod
  def from_dict(cls, d):
    d = dict(d)
    d['holdout_scores'] = tuple(float(x) for x in d.get('holdout_scores', ()))
    d['test'] = tuple(sorted(dict(d.get('test', {})).items()))
    return cls(**d)


@struct.dataclass
class PatchCore:
  """A fitted PatchCore: everything needed to score images.

  A pytree whose leaves are the backbone's variables and the memory bank; the rest is static.
  backbone: the `backbones.Backbone` (its name, stages and weights_sha256 identify it).
  bank: the prepared memory bank (`knn.Bank`).
  settings: every hyperparameter (`Settings`).
  calibration: thresholds (`Calibration`).
  info: (name, value) pairs about the fit: num_train_images, memory_bank_rows (before the
    coreset), fit timings, created (UTC, ISO 8601).
  version: the library version that fitted it.
  """
  backbone: backbones_lib.Backbone
  bank: knn.Bank
  settings: Settings = struct.field(pytree_node=False)
  calibration: Calibration = struct.field(pytree_node=False, default=Calibration())
  info: Tuple[Tuple[str, Any], ...] = struct.field(pytree_node=False, default=())
  version: str = struct.field(pytree_node=False, default=__version__)

  @property
  def memory_bank_size(self):
    return self.bank.size


class Prediction(NamedTuple):
  """What `predict` returns, numpy arrays over N images.

  image_scores: [N] float32 raw scores (squared L2 by default; see Settings.distance).
  normalized_scores: [N] score / (2 * threshold), 0.5 at the threshold; None without one.
  anomalous: [N] bool, score > threshold; None without a threshold.
  maps: [N, S, S] float32 anomaly maps at the network's input size.
  patch_scores: [N, h, w] float32 patch scores.
  """
  image_scores: np.ndarray
  normalized_scores: Optional[np.ndarray]
  anomalous: Optional[np.ndarray]
  maps: np.ndarray
  patch_scores: np.ndarray


def with_threshold(model, image_threshold, *, pixel_threshold=None):
  """The model with a hand-set threshold (source 'manual'); pixel threshold defaults to it."""
  calibration = dataclasses.replace(
      model.calibration, image_threshold=float(image_threshold), image_threshold_source='manual',
      pixel_threshold=float(image_threshold if pixel_threshold is None else pixel_threshold),
      pixel_threshold_source='manual')
  return model.replace(calibration=calibration)


def decide(calibration, image_scores):
  """(normalised scores, anomalous) of raw image scores, or (None, None) without a threshold."""
  threshold = calibration.image_threshold
  if threshold is None:
    return None, None
  scores = np.asarray(image_scores, np.float32)
  return scores / np.float32(2.0 * threshold), scores > threshold


def holdout_threshold(scores, *, target_fpr):
  """The (m+1)-th largest of n scores, m = floor(target_fpr * n): at most m lie above it."""
  scores = np.sort(np.asarray(scores, np.float64))[::-1]
  if not len(scores):
    raise ValueError('no held-out scores to calibrate on')
  m = min(int(np.floor(target_fpr * len(scores))), len(scores) - 1)
  return float(scores[m])


def holdout_calibration(scores, *, target_fpr):
  """The `Calibration` of held-out good images' scores (`holdout_threshold`)."""
  threshold = holdout_threshold(scores, target_fpr=target_fpr)
  return Calibration(
      image_threshold=threshold, image_threshold_source='holdout', pixel_threshold=threshold,
      pixel_threshold_source='holdout', holdout_scores=tuple(float(s) for s in np.sort(scores)),
      target_fpr=target_fpr)


def split_holdout(num_images, *, holdout, seed):
  """(train indices, held-out indices), both sorted: round(holdout * N) images (at least one
  when holdout > 0, and at least one left to fit on), chosen by a seeded permutation."""
  if not 0.0 <= holdout < 1.0:
    raise errors.UserError(f'holdout={holdout} is not allowed: must be in [0, 1)')
  count = 0 if holdout == 0 else max(1, int(round(holdout * num_images)))
  if count >= num_images:
    raise errors.UserError(f'holdout={holdout} of {num_images} images leaves none to fit on')
  order = np.random.default_rng(seed).permutation(num_images)
  return np.sort(order[count:]), np.sort(order[:count])
