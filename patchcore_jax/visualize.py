"""Anomaly-map overlays as PNG files (numpy + PIL only)."""
import numpy as np
from PIL import Image
from PIL import ImageDraw
from PIL import ImageFont

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


def format_value(value):
  """A score for people: thousands separated above 1000, 4 significant digits below."""
  return f'{value:,.0f}' if abs(value) >= 1000 else f'{value:.4g}'


def _font(size):
  try:
    return ImageFont.load_default(size=size)
  except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font.
    return ImageFont.load_default()


def labelled_overlay(image, anomaly_map, mask, *, vmin, vmax, lines, ticks=()):
  """`overlay` with a caption above and a colour bar below.

  Args:
    image, anomaly_map, mask, vmin, vmax: as `overlay` (vmin/vmax a fixed, calibrated scale).
    lines: caption lines (file name; score, threshold, decision).
    ticks: (value, label) pairs marked on the colour bar (e.g. the threshold).
  Returns:
    [caption + H + bar, 3 * W, 3] uint8.
  """
  panel = overlay(image, anomaly_map, mask, vmin=vmin, vmax=vmax)
  width = panel.shape[1]
  font = _font(max(10, panel.shape[0] // 16))
  line_height = int(font.getbbox('Ag')[3]) + 4
  caption = Image.new('RGB', (width, line_height * len(lines) + 6), (0, 0, 0))
  draw = ImageDraw.Draw(caption)
  for i, line in enumerate(lines):
    draw.text((4, 3 + i * line_height), line, fill=(255, 255, 255), font=font)
  ramp = (colorize(np.tile(np.linspace(0, 1, width)[None], (12, 1))) * 255).astype(np.uint8)
  bar = Image.new('RGB', (width, 12 + line_height + 4), (0, 0, 0))
  bar.paste(Image.fromarray(ramp), (0, 0))
  draw = ImageDraw.Draw(bar)
  for value, label in ((vmin, format_value(vmin)), *ticks, (vmax, format_value(vmax))):
    x = int(round((value - vmin) / max(vmax - vmin, 1e-12) * (width - 1)))
    x = min(max(x, 0), width - 1)
    draw.line([(x, 0), (x, 14)], fill=(255, 255, 255))
    text_width = draw.textlength(label, font=font)
    draw.text((min(max(x - text_width / 2, 0), width - text_width), 15), label,
              fill=(255, 255, 255), font=font)
  return np.concatenate([np.asarray(caption), panel, np.asarray(bar)], axis=0)


def caption(name, score, calibration):
  """(caption lines, colour-bar ticks) of a labelled overlay, for a `model.Calibration`."""
  threshold = calibration.image_threshold
  if threshold is None:
    return [name, f'score {format_value(score)} | no threshold'], ()
  decision = 'ANOMALOUS' if score > threshold else 'ok'
  source = calibration.image_threshold_source
  return ([name, f'score {format_value(score)} | threshold {format_value(threshold)} ({source}) | '
                 f'{decision}'], ((threshold, f'threshold {format_value(threshold)}'),))
