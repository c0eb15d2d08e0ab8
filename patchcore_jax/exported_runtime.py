"""Runs a model exported by `patchcore_jax.export` with jax and numpy alone.

This file is copied into every export directory as `patchcore_exported.py`; it imports nothing of
patchcore_jax, so a deployment needs only `pip install jax numpy`:

  import patchcore_exported
  model = patchcore_exported.load('exported_model')
  out = model(images)  # uint8 [N, S, S, 3] RGB at the input size (model.image_size)
  out['scores'], out['normalized_scores'], out['anomalous'], out['maps']

Images must already be resized and cropped as `model.preprocessing` says (for 'resize_crop':
shorter side to `resize` with a bilinear filter, centre crop `image_size`; for 'resize': straight
to image_size squared). Any number of images is scored in padded batches of the exported size.
"""
import json
import os

import jax
from jax import export as jax_export
import numpy as np


class ExportedPatchCore:
  """A loaded export: call it on uint8 images [N, S, S, 3]."""

  def __init__(self, directory):
    with open(os.path.join(directory, 'export.json')) as f:
      self.meta = json.load(f)
    with open(os.path.join(directory, 'predict.jaxexport'), 'rb') as f:
      self._exported = jax_export.deserialize(bytearray(f.read()))
    with np.load(os.path.join(directory, 'params.npz'), allow_pickle=False) as f:
      self._params = [jax.numpy.asarray(f[f'p{i:05d}']) for i in range(self.meta['num_params'])]
    self.batch_size = self.meta['batch_size']
    self.image_size = self.meta['preprocessing']['image_size']
    self.preprocessing = self.meta['preprocessing']
    self.threshold = self.meta['image_threshold']

  def __call__(self, images):
    """images: uint8 [N, S, S, 3] -> dict of numpy arrays: scores [N], normalized_scores [N] and
    anomalous [N] (None without a threshold), maps [N, S, S], patch_scores [N, h, w]."""
    images = np.asarray(images)
    size = self.image_size
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1:] != (size, size, 3):
      raise ValueError(f'expected uint8 images [N, {size}, {size}, 3], got {images.dtype} '
                       f'{images.shape}')
    outputs = ([], [], [])
    for start in range(0, len(images), self.batch_size):
      batch = images[start:start + self.batch_size]
      count = len(batch)
      if count < self.batch_size:
        batch = np.concatenate([batch, np.zeros((self.batch_size - count,) + batch.shape[1:],
                                                np.uint8)])
      result = self._exported.call(self._params, batch)
      for part, value in zip(outputs, result):
        part.append(np.asarray(value)[:count])
    scores, maps, patch_scores = (np.concatenate(p) for p in outputs)
    out = {'scores': scores, 'maps': maps, 'patch_scores': patch_scores,
           'normalized_scores': None, 'anomalous': None}
    if self.threshold is not None:
      out['normalized_scores'] = scores / np.float32(2.0 * self.threshold)
      out['anomalous'] = scores > self.threshold
    return out


def load(directory):
  """Loads an export directory written by `patchcore_jax.export`."""
  return ExportedPatchCore(directory)
