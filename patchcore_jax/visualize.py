"""Anomaly-map overlays as PNG files (numpy + PIL only)."""
import numpy as np
from PIL import Image

# A perceptually ordered dark-blue -> cyan -> yellow -> red ramp.
_STOPS = np.array([[0.0, 0.0, 0.2], [0.0, 0.3, 0.9], [0.0, 0.9, 0.9], [1.0, 1.0, 0.0],
                   [1.0, 0.3, 0.0], [0.7, 0.0, 0.0]])


def colorize(values):
  """values: [H, W] in [0, 1] -> [H, W, 3] float RGB."""
  x = np.clip(values, 0, 1) * (len(_STOPS) - 1)
  lo = np.floor(x).astype(int).clip(0, len(_STOPS) - 2)
  frac = (x - lo)[..., None]
  return _STOPS[lo] * (1 - frac) + _STOPS[lo + 1] * frac


def _edges(mask):
  m = np.pad(mask, 1)
  interior = m[1:-1, 1:-1] & m[:-2, 1:-1] & m[2:, 1:-1] & m[1:-1, :-2] & m[1:-1, 2:]
  return mask & ~interior


def overlay(image, anomaly_map, mask, *, vmin, vmax):
  """Side by side: input (ground-truth outline in green), heat map, heat map over the input.

  Args:
    image: [H, W, 3] float in [0, 1]; anomaly_map: [H, W]; mask: [H, W] bool or None.
    vmin, vmax: the score range mapped to the colour ramp (use the whole test set's).
  Returns:
    [H, 3 * W, 3] uint8.
  """
  heat = colorize((anomaly_map - vmin) / max(vmax - vmin, 1e-12))
  left = image.copy()
  if mask is not None and mask.any():
    left[_edges(mask)] = (0.0, 1.0, 0.0)
  blend = 0.5 * image + 0.5 * heat
  return (np.concatenate([left, heat, blend], axis=1) * 255).round().astype(np.uint8)


def save_overlay(path, *args, **kwargs):
  Image.fromarray(overlay(*args, **kwargs)).save(path)
