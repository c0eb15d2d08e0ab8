"""Sample records and batched, threaded loading."""
import concurrent.futures
import dataclasses
import os
from typing import List, Optional

import numpy as np

from patchcore_jax.data import transforms

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff', '.webp')


@dataclasses.dataclass(frozen=True)
class Sample:
  path: str
  label: int  # 0 good, 1 anomalous.
  defect: str  # 'good' or the defect type.
  mask_path: Optional[str] = None  # None: no mask (all good if label == 0).


@dataclasses.dataclass(frozen=True)
class Split:
  name: str
  root: str  # Paths in outputs are written relative to this.
  train: List[Sample]
  test: List[Sample]

  @property
  def has_masks(self):
    return any(s.mask_path for s in self.test if s.label == 1)


def list_images(directory):
  """Sorted image files in `directory` (no recursion)."""
  if not os.path.isdir(directory):
    raise FileNotFoundError(f'no such directory: {directory}')
  return sorted(os.path.join(directory, f) for f in os.listdir(directory)
                if f.lower().endswith(IMAGE_EXTENSIONS))


def iterate_batches(samples, *, batch_size, image_config, with_masks=False, num_workers=2):
  """Yields (images [batch_size, S, S, 3] float32 in [0, 1], masks [batch_size, S, S] bool or None,
  count) with the last batch zero-padded to `batch_size` (so jitted consumers compile once);
  `count` is the number of real samples in the batch. Loading overlaps with the consumer."""

  def load(sample):
    image = transforms.load_image(sample.path, **image_config)
    mask = None
    if with_masks:
      if sample.mask_path:
        mask = transforms.load_mask(sample.mask_path, **image_config)
      else:
        mask = np.zeros(image.shape[:2], bool)
    return image, mask

  batches = [samples[i:i + batch_size] for i in range(0, len(samples), batch_size)]
  with concurrent.futures.ThreadPoolExecutor(max(1, num_workers)) as pool:
    pending = [pool.map(load, b) for b in batches[:2]]
    for i, _ in enumerate(batches):
      loaded = list(pending[i])
      if i + 2 < len(batches):
        pending.append(pool.map(load, batches[i + 2]))
      count = len(loaded)
      images = np.stack([im for im, _ in loaded])
      masks = np.stack([m for _, m in loaded]) if with_masks else None
      if count < batch_size:
        images = np.concatenate([images, np.zeros((batch_size - count,) + images.shape[1:],
                                                  images.dtype)])
        if masks is not None:
          masks = np.concatenate([masks, np.zeros((batch_size - count,) + masks.shape[1:], bool)])
      yield images, masks, count
