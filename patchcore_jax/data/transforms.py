"""Image and mask preprocessing as the official code does it (torchvision on PIL images).

'resize_crop': resize the shorter side to `resize` with PIL's bilinear filter (what
  `torchvision.transforms.Resize(resize)` does on PIL images), then centre-crop `image_size`.
'resize': resize straight to `image_size` x `image_size` (no crop; for non-square data like MTD).
Masks go through the same geometry; a pixel is defective where the resized mask value is >= 0.5
(>= 128 of 255).

Decoding rules (`to_8bit_rgb`), so that every file means what a person viewing it sees:
  * EXIF orientation is applied first (phone and camera JPEGs), as image viewers do.
  * 8-bit grayscale, palette, CMYK, RGB and RGBA (alpha ignored) images become RGB.
  * 16-bit grayscale ('I;16*', and 'I' whose values fit in 16 bits) is scaled by its full range,
    value / 65535, then rounded to 8 bits; 16-bit RGB PNGs are read at 8 bits by PIL itself.
  * 32-bit integer ('I') outside 0..65535, and 32-bit float ('F', e.g. TIFF): values already in
    [0, 1] are taken as they are; anything else is min-max scaled to [0, 1] with a warning that
    names the file (a constant image becomes black).
  * A float image holding NaN or infinite pixels is refused (`NonFiniteImage`, naming the file
    and how many pixels): no value would say what the camera saw there.
  * Images declaring more pixels than PIL's limit (`Image.MAX_IMAGE_PIXELS`, ~89 M; a
    "decompression bomb") are refused before decoding, with an error naming the file.
"""
import warnings

from absl import logging
import numpy as np
from PIL import Image
from PIL import ImageOps

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


class ImageTooLarge(ValueError):
  """An image declares more pixels than PIL's decompression-bomb limit."""


class NonFiniteImage(ValueError):
  """A float image holds NaN or infinite pixels."""


def _check_finite(values, path):
  finite = np.isfinite(values)
  if not finite.all():
    bad = values[~finite]
    raise NonFiniteImage(
        f'{_name(path)}: {bad.size} of {values.size} pixels are not finite ({int(np.isnan(bad).sum())} '
        f'NaN, {int(np.isinf(bad).sum())} infinite): refusing to score it')


def nonfinite_problem(path):
  """None, or what is wrong with a float image (mode 'F') holding NaN or infinite pixels.
  Decodes float images only; any other mode cannot hold them and is not decoded."""
  with open_image(path) as img:
    if img.mode != 'F':
      return None
    try:
      _check_finite(np.asarray(img, np.float64), path)
    except NonFiniteImage as error:
      return str(error).split(': ', 1)[1]
  return None


def _name(file):
  return getattr(file, 'name', file)


def open_image(path):
  """PIL's `Image.open` with the decompression-bomb warning made an error naming the file.
  `path`: a path or an open binary file (e.g. `data.common.NamedBytes`)."""
  with warnings.catch_warnings():
    warnings.simplefilter('error', Image.DecompressionBombWarning)
    try:
      return Image.open(path)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
      raise ImageTooLarge(f'{_name(path)}: {error}') from error


def to_8bit(img, path=''):
  """A PIL image in any mode -> 8 bits per channel ('L', 'RGB', 'RGBA', 'P', ...), by the rules in
  the module docstring."""
  mode = img.mode
  if mode.startswith('I;16'):
    values = np.asarray(img, np.float64) / 65535.0
  elif mode in ('I', 'F'):
    values = np.asarray(img, np.float64)
    _check_finite(values, path)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if mode == 'I' and low >= 0 and high <= 65535:
      values = values / 65535.0
    elif not (low >= 0.0 and high <= 1.0):
      logging.warning('%s: %s image with values in [%g, %g]: scaled min-max to [0, 1]', path,
                      'float' if mode == 'F' else '32-bit integer', low, high)
      values = (values - low) / (high - low) if high > low else np.zeros_like(values)
  else:
    return img
  return Image.fromarray(np.round(np.clip(values, 0.0, 1.0) * 255.0).astype(np.uint8))


def _decoded(img, path, mode):
  """The opened image decoded, EXIF-oriented, 8-bit, in `mode`; no copies where nothing changes
  (two full-size copies were 4.5 of a 900 x 900 PNG's 29 ms)."""
  img.load()
  ImageOps.exif_transpose(img, in_place=True)
  img = to_8bit(img, _name(path))
  return img if img.mode == mode else img.convert(mode)


def load_image(path, *, resize=256, image_size=224, transform='resize_crop', return_size=False):
  """-> [image_size, image_size, 3] float32 RGB in [0, 1] (and the file's (width, height), as
  displayed, with `return_size`)."""
  with open_image(path) as img:
    img = _decoded(img, path, 'RGB')
    size = img.size
    img = _geometry(img, resize=resize, image_size=image_size, transform=transform)
    image = np.asarray(img, np.float32) / 255.0
  return (image, size) if return_size else image


def image_size_of(path):
  """The (width, height) of an image file as displayed (EXIF orientation applied), from its
  header alone."""
  with open_image(path) as img:
    width, height = img.size
    if img.format == 'PNG':  # getexif() would decode a PNG to look past its pixels: header only.
      exif = Image.Exif()
      if img.info.get('exif'):
        exif.load(img.info['exif'])
    else:
      exif = img.getexif()
    orientation = exif.get(0x0112, 1)  # EXIF Orientation.
  return (height, width) if orientation in (5, 6, 7, 8) else (width, height)


def load_mask(path, *, resize=256, image_size=224, transform='resize_crop'):
  """-> [image_size, image_size] bool, True where the resized mask is >= 0.5."""
  with open_image(path) as img:
    img = _geometry(_decoded(img, path, 'L'), resize=resize, image_size=image_size,
                    transform=transform)
    return np.asarray(img) >= 128
