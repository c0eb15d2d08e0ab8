"""A small, deterministic, procedurally generated anomaly-detection dataset with pixel masks.

It needs no download, so the demo runs anywhere. Each category is written once, in MVTec AD's
folder layout, under `<root>/<category>`; a marker file records the generator version so the same
files are reused.

  'weave':  a woven-fabric texture (two sets of sinusoidal threads with per-image jitter, thread
            irregularities and sensor noise). Defects: 'scratch' (thin bright or dark curved
            lines), 'spot' (dark stains with soft edges), 'hole' (a missing-thread patch).
  'tiles':  a grid of glazed tiles with grout lines, lighting gradient and noise. Defects:
            'crack' (dark polyline crossing a tile), 'chip' (a missing corner of a tile),
            'stain' (a tinted blob).
"""
import os

import numpy as np
from PIL import Image

SYNTHETIC_CATEGORIES = ('weave', 'tiles')
_VERSION = '1'
_SIZE = 256
_COUNTS = {'train': 60, 'good': 15, 'defect': 12}  # Defective test images per defect type.
_DEFECTS = {'weave': ('hole', 'scratch', 'spot'), 'tiles': ('chip', 'crack', 'stain')}


def _grid(size):
  y, x = np.mgrid[0:size, 0:size].astype(np.float32)
  return y, x


def _weave(rng, size):
  y, x = _grid(size)
  period = rng.uniform(9.0, 10.0)
  phase = rng.uniform(0, 2 * np.pi, 2)
  angle = rng.normal(0, 0.03)
  u = x * np.cos(angle) - y * np.sin(angle)
  v = x * np.sin(angle) + y * np.cos(angle)
  warp = np.sin(2 * np.pi * u / period + phase[0] + 0.4 * np.sin(v / 23.0))
  weft = np.sin(2 * np.pi * v / period + phase[1] + 0.4 * np.sin(u / 29.0))
  checker = np.sign(np.sin(np.pi * u / period)) * np.sign(np.sin(np.pi * v / period))
  base = 0.5 + 0.18 * np.where(checker > 0, warp, weft) + 0.04 * rng.normal(size=(size, size))
  tint = np.array([0.75, 0.62, 0.48]) + rng.normal(0, 0.02, 3)
  return np.clip(base[..., None] * tint * 1.4, 0, 1)


def _tiles(rng, size):
  y, x = _grid(size)
  pitch = 64
  off = rng.integers(0, pitch, 2)
  gy, gx = (y + off[0]) % pitch, (x + off[1]) % pitch
  grout = (np.minimum(gy, pitch - gy) < 3) | (np.minimum(gx, pitch - gx) < 3)
  light = 0.85 + 0.1 * (x + y) / (2 * size) + rng.normal(0, 0.02)
  glaze = light + 0.025 * np.sin(x / 7.0 + rng.uniform(0, 6)) * np.sin(y / 11.0)
  img = np.where(grout, 0.35, glaze)[..., None] * np.array([0.55, 0.7, 0.85])
  img = img + 0.02 * rng.normal(size=(size, size, 1))
  return np.clip(img, 0, 1)


def _blob(rng, size, radius):
  y, x = _grid(size)
  cy, cx = rng.uniform(radius + 8, size - radius - 8, 2)
  theta = np.arctan2(y - cy, x - cx)
  wobble = 1 + 0.25 * np.sin(3 * theta + rng.uniform(0, 6)) + 0.15 * np.sin(5 * theta)
  return np.hypot(y - cy, x - cx) / (radius * wobble)  # < 1 inside.


def _polyline(rng, size, width, steps=6):
  y, x = _grid(size)
  point = rng.uniform(40, size - 40, 2)
  direction = rng.uniform(0, 2 * np.pi)
  dist = np.full((size, size), np.inf, np.float32)
  for _ in range(steps):
    direction += rng.normal(0, 0.35)
    nxt = np.clip(point + 18 * np.array([np.sin(direction), np.cos(direction)]), 4, size - 5)
    seg = nxt - point
    t = np.clip(((y - point[0]) * seg[0] + (x - point[1]) * seg[1]) / max(seg @ seg, 1e-6), 0, 1)
    dist = np.minimum(dist, np.hypot(y - point[0] - t * seg[0], x - point[1] - t * seg[1]))
    point = nxt
  return dist <= width


def _defect(rng, img, kind):
  size = img.shape[0]
  if kind in ('scratch', 'crack'):
    mask = _polyline(rng, size, width=1.6 if kind == 'scratch' else 1.2)
    value = rng.choice([0.05, 0.95]) if kind == 'scratch' else 0.08
    img = np.where(mask[..., None], value, img)
  elif kind in ('spot', 'stain'):
    r = _blob(rng, size, rng.uniform(8, 16))
    mask = r < 1
    alpha = np.clip(1.5 * (1 - r), 0, 0.8)[..., None]
    color = np.array([0.15, 0.1, 0.05]) if kind == 'spot' else np.array([0.7, 0.45, 0.2])
    img = img * (1 - alpha) + alpha * color
  elif kind == 'hole':
    r = _blob(rng, size, rng.uniform(7, 12))
    mask = r < 1
    img = np.where(mask[..., None], 0.12 + 0.03 * rng.normal(size=img.shape), img)
  elif kind == 'chip':
    r = _blob(rng, size, rng.uniform(9, 14))
    mask = r < 1
    img = np.where(mask[..., None], np.array([0.6, 0.58, 0.55]), img)
  else:
    raise ValueError(kind)
  return np.clip(img, 0, 1), mask


def _save(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(np.round(np.asarray(array) * 255).astype(np.uint8)).save(path)


def make_synthetic_dataset(root, category, *, seed=0):
  """Writes category `category` under `root` (once) and returns its directory."""
  if category not in SYNTHETIC_CATEGORIES:
    raise ValueError(f'unknown synthetic category {category!r}; known: {SYNTHETIC_CATEGORIES}')
  directory = os.path.join(root, category)
  marker = os.path.join(directory, f'.generated-v{_VERSION}-seed{seed}')
  if os.path.exists(marker):
    return directory
  texture = _weave if category == 'weave' else _tiles
  rng = np.random.default_rng([seed, SYNTHETIC_CATEGORIES.index(category)])
  for i in range(_COUNTS['train']):
    _save(os.path.join(directory, 'train', 'good', f'{i:03d}.png'), texture(rng, _SIZE))
  for i in range(_COUNTS['good']):
    _save(os.path.join(directory, 'test', 'good', f'{i:03d}.png'), texture(rng, _SIZE))
  for kind in _DEFECTS[category]:
    for i in range(_COUNTS['defect']):
      img, mask = _defect(rng, texture(rng, _SIZE), kind)
      _save(os.path.join(directory, 'test', kind, f'{i:03d}.png'), img)
      _save(os.path.join(directory, 'ground_truth', kind, f'{i:03d}_mask.png'), mask.astype(float))
  open(marker, 'w').close()
  return directory
