"""Sample records and batched, threaded loading.

A `Sample` names its image (and mask) by path. Samples read from a file-less store (a TFDS
`data_source`) carry a `source` whose `read(name)` returns the file's bytes; `open_image_file`
gives either to the decoder, so both paths decode the very same bytes the same way.
"""
import collections
import concurrent.futures
import dataclasses
import io
import os
from typing import Any, List, NamedTuple, Optional

import jax
import numpy as np

from patchcore_jax import errors
from patchcore_jax.data import transforms

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


@dataclasses.dataclass(frozen=True)
class Sample:
  path: str
  label: int  # 0 good, 1 anomalous.
  defect: str  # 'good' or the defect type.
  mask_path: Optional[str] = None  # None: no mask (all good if label == 0).
  # None: `path` and `mask_path` are files. Else an object whose read(name) returns the bytes of
  # the file called `name` (`path` or `mask_path`), e.g. a TFDS record (data.tfds_builders).
  source: Any = dataclasses.field(default=None, compare=False, repr=False)


@dataclasses.dataclass(frozen=True)
class Split:
  name: str
  root: str  # Paths in outputs are written relative to this ('': they already are).
  train: List[Sample]
  test: List[Sample]

  def relative(self, path):
    """`path` (a sample's `path` or `mask_path`) as outputs name it."""
    return os.path.relpath(path, self.root) if self.root else path

  @property
  def has_masks(self):
    return any(s.mask_path for s in self.test if s.label == 1)


class Batch(NamedTuple):
  """One batch of images, zero-padded to the batch size so that jitted consumers compile once.

  images: [B, S, S, 3] float32 in [0, 1].
  count: how many of the B rows are real images (the rest is padding).
  masks: [B, S, S] bool ground truth, or None when not asked for.
  """
  images: np.ndarray
  count: int
  masks: Optional[np.ndarray] = None


class NamedBytes(io.BytesIO):
  """The bytes of a file, opened in memory, that keep the file's name for messages."""

  def __init__(self, data, name):
    super().__init__(data)
    self.name = name


def open_file(sample, name):
  """The file called `name` of `sample` (its `path` or `mask_path`): the path itself, or, for a
  sample with a `source`, its bytes as a `NamedBytes`."""
  source = getattr(sample, 'source', None)
  return name if source is None else NamedBytes(source.read(name), name)


def list_images(directory):
  """Sorted image files in `directory` (no recursion)."""
  if not os.path.isdir(directory):
    raise errors.UserError(f'no such directory: {directory}')
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_EXTENSIONS))


def _truncated(file, name):
  """Whether a PNG or JPEG file lacks its closing marker (a copy cut short), from its last bytes."""
  lower = name.lower()
  if not lower.endswith(('.png', '.jpg', '.jpeg')):
    return False
  if isinstance(file, io.BytesIO):
    tail = file.getvalue()[-32:]
  else:
    with open(file, 'rb') as f:
      f.seek(0, os.SEEK_END)
      f.seek(max(0, f.tell() - 32))
      tail = f.read()
  if lower.endswith('.png'):
    return b'IEND' not in tail
  return b'\xff\xd9' not in tail


def _read_header(sample, path):
  """(problem, None) when the image file `path` of `sample` cannot be used (from its header and
  last bytes), else (None, its displayed (width, height))."""
  try:
    file = open_file(sample, path)
    empty = (not file.getvalue()) if isinstance(file, io.BytesIO) else os.path.getsize(file) == 0
    if empty:
      return 'empty file (0 bytes)', None
    size = transforms.image_size_of(file)
  except transforms.ImageTooLarge as error:
    return f'too many pixels to decode safely ({error})', None
  except Exception as error:  # pylint: disable=broad-except
    return f'not a readable image ({type(error).__name__}: {error})', None
  if min(size) < 1:
    return f'has no pixels ({size[0]} x {size[1]})', None
  if _truncated(file, path):
    return 'truncated (the file ends before its closing marker)', None
  try:
    problem = transforms.nonfinite_problem(file)  # Decodes float images only.
  except Exception as error:  # pylint: disable=broad-except
    problem = f'not a readable image ({type(error).__name__}: {error})'
  if problem:
    return problem, None
  return None, size


def check_split(split, *, max_listed=20):
  """Checks every file of `split` before any work, from headers alone (milliseconds per file).

  Raises errors.UserError listing each image or mask that cannot be read (empty, not an image,
  truncated, too many pixels, NaN or infinite pixels in a float image) and each mask whose size differs from its image's.
  Returns:
    The defective test samples without a mask when other defective samples have one: they are
    excluded from pixel metrics (a warning names them); [] otherwise.
  """
  problems = []
  for sample in list(split.train) + list(split.test):
    problem, image_size = _read_header(sample, sample.path)
    if problem:
      problems.append(f'{sample.path}: {problem}')
      continue
    if sample.mask_path:
      problem, mask_size = _read_header(sample, sample.mask_path)
      if problem:
        problems.append(f'mask {sample.mask_path}: {problem}')
        continue
      if image_size != mask_size:
        problems.append(f'mask {sample.mask_path} is {mask_size[0]} x {mask_size[1]} pixels, '
                        f'its image {sample.path} is {image_size[0]} x {image_size[1]}')
  if problems:
    listed = problems[:max_listed]
    more = f'\n  ... and {len(problems) - max_listed} more' if len(problems) > max_listed else ''
    raise errors.UserError(f'{split.name}: {len(problems)} unusable file(s):\n  ' +
                           '\n  '.join(listed) + more)
  if not split.has_masks:
    return []
  return [s for s in split.test if s.label == 1 and not s.mask_path]


def default_prefetch():
  """Batches to decode ahead of the consumer: 2 where the compute runs on an accelerator, 0 on
  the CPU backend.

  On a CPU-only machine the compute already uses every core: decoding beside it (measured: VGG16
  on MVTec bottle, 2 cores, 8-image batches) did not hide the decoding but slowed each compute
  batch by more than the decoding's own CPU time (XLA splits every operation over its threads and
  waits for the slowest, which a decoding thread has preempted). There each batch is decoded
  when it is asked for, by all `num_workers` threads at once.
  """
  return 0 if jax.default_backend() == 'cpu' else 2


def default_device_prefetch():
  """Batches whose host-to-device copy is issued ahead of the one being computed: 2 on an
  accelerator (the copies run beside the compute, and the next batch is on the device before
  the current batch's results are pulled), 0 on the CPU backend (no copy to hide)."""
  return 0 if jax.default_backend() == 'cpu' else 2


def decode_workers(num_workers):
  """Image-decoding threads for `num_workers` (config.data.num_workers): itself when positive;
  0 means what the machine suits: 2 on the CPU backend (the compute uses every core), on an
  accelerator one per CPU core up to 16 (a 900-px PNG takes ~20 ms to decode: two threads feed
  100 images/s, far below a GPU's backbone)."""
  if num_workers > 0:
    return num_workers
  return 2 if jax.default_backend() == 'cpu' else max(2, min(16, os.cpu_count() or 2))


def lookahead(items, *, ahead, put):
  """Yields put(item) for every item of `items`, in order, calling `put` on the next `ahead` items
  before an item is handed out (`to_device`)."""
  queue = collections.deque()
  for item in items:
    queue.append(put(item))
    if len(queue) > ahead:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def to_device(batches, *, ahead=None):
  """Yields the `Batch`es of `batches` with their images as device arrays, the host-to-device
  copies of the next `ahead` batches (None: `default_device_prefetch()`) issued before a batch is
  handed out, so that they overlap its compute and the pull of its results. ahead=0 yields the
  batches as they are. Masks stay on the host."""
  ahead = default_device_prefetch() if ahead is None else ahead
  if ahead <= 0:
    yield from batches
    return
  yield from lookahead(batches, ahead=ahead,
                       put=lambda batch: batch._replace(images=jax.device_put(batch.images)))


def map_in_batches(fn, items, *, batch_size, num_workers=2, prefetch=None):
  """Yields, per batch of `batch_size` items in order, a list of (item, fn(item) or None, error or
  None). `fn` runs in `num_workers` threads (0: `decode_workers`), at most `prefetch` batches ahead of the consumer
  (None: `default_prefetch()`), so memory stays bounded however many items there are. An item
  whose `fn` raises gets its exception instead of a value; the caller decides whether that stops
  the run."""

  def safe(item):
    try:
      return item, fn(item), None
    except Exception as error:  # pylint: disable=broad-except
      return item, None, error

  batches = [items[i:i + batch_size] for i in range(0, len(items), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(decode_workers(num_workers)) as pool:
    ahead = default_prefetch() if prefetch is None else prefetch
    pending = []
    for i, _ in enumerate(batches):
      # Batches i .. i + ahead are submitted; the later ones decode while the consumer works.
      while len(pending) < min(i + ahead + 1, len(batches)):
        pending.append(pool.map(safe, batches[len(pending)]))
      loaded = list(pending[i])
      pending[i] = None
      yield loaded


def pad_batch(arrays, batch_size):
  """Stacks a list of equal-shape arrays and zero-pads it to `batch_size` rows."""
  stacked = np.stack(arrays)
  if len(arrays) < batch_size:
    stacked = np.concatenate([stacked, np.zeros((batch_size - len(arrays),) + stacked.shape[1:],
                                                stacked.dtype)])
  return stacked


def iterate_batches(samples, *, batch_size, image_config, with_masks=False, num_workers=2):
  """Yields a `Batch` per `batch_size` samples, the last one zero-padded; masks are loaded with
  `with_masks`. Batches load ahead of the consumer as `map_in_batches`' `prefetch` says (by
  default not on the CPU backend: `default_prefetch`). Samples are `Sample` records or plain
  paths; a file that cannot be read raises an error naming it."""

  def load(sample):
    path = getattr(sample, 'path', sample)
    image = transforms.load_image(open_file(sample, path), **image_config)
    mask = None
    if with_masks:
      if sample.mask_path:
        try:
          mask = transforms.load_mask(open_file(sample, sample.mask_path), **image_config)
        except Exception as error:  # pylint: disable=broad-except
          raise errors.UserError(f'cannot read mask {sample.mask_path}: {error}') from error
      else:
        mask = np.zeros(image.shape[:2], bool)
    return image, mask

  for loaded in map_in_batches(load, samples, batch_size=batch_size, num_workers=num_workers):
    for sample, _, error in loaded:
      if isinstance(error, errors.UserError):
        raise error
      if error is not None:
        path = getattr(sample, 'path', sample)
        raise errors.UserError(f'cannot read image {path}: {error}') from error
    images = pad_batch([value[0] for _, value, _ in loaded], batch_size)
    masks = pad_batch([value[1] for _, value, _ in loaded], batch_size) if with_masks else None
    yield Batch(images, len(loaded), masks)


def image_batches(images, *, batch_size, image_config, num_workers=2):
  """Yields a `Batch` (no masks) per `batch_size` images, the last one zero-padded.

  `images`: a sequence of paths (or `Sample`s; decoded in `num_workers` threads), a uint8 array
  [N, H, W, 3] (resized and cropped per `image_config`), or a float array [N, S, S, 3] in [0, 1]
  already at the input size S = image_config['image_size'].
  """
  if not isinstance(images, (np.ndarray, jax.Array)):
    yield from iterate_batches(list(images), batch_size=batch_size, image_config=image_config,
                               num_workers=num_workers)
    return
  array = np.asarray(images)
  if array.ndim != 4 or array.shape[-1] != 3:
    raise ValueError(f'expected images [N, H, W, 3], got shape {array.shape}')
  if array.dtype != np.uint8:
    size = image_config['image_size']
    if array.shape[1:3] != (size, size):
      raise ValueError(f'float images must already be {size} x {size} (the input size), got '
                       f'{array.shape[1:3]}; pass uint8 images to resize them')
  for start in range(0, len(array), batch_size):
    chunk = array[start:start + batch_size]
    if array.dtype == np.uint8:
      chunk = [transforms.from_array(x, **image_config) for x in chunk]
    else:
      chunk = list(np.asarray(chunk, np.float32))
    yield Batch(pad_batch(chunk, batch_size), len(chunk))
