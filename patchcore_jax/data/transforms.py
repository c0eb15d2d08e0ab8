"""Image and mask preprocessing as the official code does it (torchvision on PIL images).

'resize_crop': resize the shorter side to `resize` with PIL's bilinear filter (what
  `torchvision.transforms.Resize(resize)` does on PIL images), then centre-crop `image_size`.
'resize': resize straight to `image_size` x `image_size` (no crop; for non-square data like MTD).
Grayscale, palette and RGBA images become RGB. Masks go through the same geometry; a pixel is
defective where the resized mask value is >= 0.5 (>= 128 of 255).
"""
import numpy as np
from PIL import Image

TRANSFORMS = ('resize_crop', 'resize')


def _geometry(img, *, resize, image_size, transform):
  if transform == 'resize_crop':
    w, h = img.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
    img = img.resize((new_w, new_h), Image.BILINEAR)
    top = int(round((new_h - image_size) / 2.0))
    left = int(round((new_w - image_size) / 2.0))
    return img.crop((left, top, left + image_size, top + image_size))
  if transform == 'resize':
    return img.resize((image_size, image_size), Image.BILINEAR)
  raise ValueError(f'transform must be one of {TRANSFORMS}, got {transform!r}')


def load_image(path, *, resize=256, image_size=224, transform='resize_crop'):
  """-> [image_size, image_size, 3] float32 RGB in [0, 1]."""
  with Image.open(path) as img:
    img = _geometry(img.convert('RGB'), resize=resize, image_size=image_size, transform=transform)
    return np.asarray(img, np.float32) / 255.0


def load_mask(path, *, resize=256, image_size=224, transform='resize_crop'):
  """-> [image_size, image_size] bool, True where the resized mask is >= 0.5."""
  with Image.open(path) as img:
    img = _geometry(img.convert('L'), resize=resize, image_size=image_size, transform=transform)
    return np.asarray(img) >= 128
