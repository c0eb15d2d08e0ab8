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


def crop_box(width, height, *, resize=256, image_size=224, transform='resize_crop'):
  """Where the network input comes from in an image of `width` x `height` pixels.

  Returns:
    (resized_width, resized_height, left, top): the image is resized to the first two, then the
    `image_size` square whose top-left corner is (left, top) is the network input.
  """
  if transform == 'resize_crop':
    short, long = (width, height) if width <= height else (height, width)
    new_short, new_long = resize, int(resize * long / short)
    new_w, new_h = (new_short, new_long) if width <= height else (new_long, new_short)
    return new_w, new_h, int(round((new_w - image_size) / 2.0)), int(round((new_h - image_size) / 2.0))
  if transform == 'resize':
    return image_size, image_size, 0, 0
  raise ValueError(f'transform must be one of {TRANSFORMS}, got {transform!r}')


def _geometry(img, *, resize, image_size, transform):
  new_w, new_h, left, top = crop_box(*img.size, resize=resize, image_size=image_size,
                                     transform=transform)
  img = img.resize((new_w, new_h), Image.BILINEAR)
  if (new_w, new_h) == (image_size, image_size):
    return img
  return img.crop((left, top, left + image_size, top + image_size))


def map_to_original(values, size, *, resize=256, image_size=224, transform='resize_crop',
                    outside=0.0):
  """Takes a [image_size, image_size] map back to an image of `size` = (width, height) pixels.

  The map is placed where the crop came from in the resized image, the rest filled with
  `outside` (with 'resize_crop', the border the crop cut off was never inspected), and the
  whole resized back to the original size with PIL's bilinear filter.
  Returns:
    [height, width] float32.
  """
  new_w, new_h, left, top = crop_box(*size, resize=resize, image_size=image_size,
                                     transform=transform)
  canvas = np.full((new_h, new_w), outside, np.float32)
  # The crop may reach past the resized image (image_size > resize): keep the overlap.
  y0, x0 = max(top, 0), max(left, 0)
  y1, x1 = min(top + image_size, new_h), min(left + image_size, new_w)
  canvas[y0:y1, x0:x1] = np.asarray(values, np.float32)[y0 - top:y1 - top, x0 - left:x1 - left]
  if (new_w, new_h) == tuple(size):
    return canvas
  return np.asarray(Image.fromarray(canvas).resize(tuple(size), Image.BILINEAR))


def from_array(array, *, resize=256, image_size=224, transform='resize_crop'):
  """An in-memory uint8 image [H, W, 3] (or [H, W]) -> [image_size, image_size, 3] float32 in
  [0, 1], through the same PIL geometry as files."""
  array = np.asarray(array)
  if array.dtype != np.uint8:
    raise ValueError(f'expected a uint8 image, got {array.dtype}')
  img = Image.fromarray(array).convert('RGB')
  img = _geometry(img, resize=resize, image_size=image_size, transform=transform)
  return np.asarray(img, np.float32) / 255.0


def load_image(path, *, resize=256, image_size=224, transform='resize_crop', return_size=False):
  """-> [image_size, image_size, 3] float32 RGB in [0, 1] (and the file's (width, height) with
  `return_size`)."""
  with Image.open(path) as img:
    size = img.size
    img = _geometry(img.convert('RGB'), resize=resize, image_size=image_size, transform=transform)
    image = np.asarray(img, np.float32) / 255.0
  return (image, size) if return_size else image


def load_mask(path, *, resize=256, image_size=224, transform='resize_crop'):
  """-> [image_size, image_size] bool, True where the resized mask is >= 0.5."""
  with Image.open(path) as img:
    img = _geometry(img.convert('L'), resize=resize, image_size=image_size, transform=transform)
    return np.asarray(img) >= 128
