"""Datasets as lists of samples, and host-side image loading.

`get_splits(config.data)` returns {category: Split}; `iterate_batches` loads images (and masks)
in a thread pool with the reference preprocessing (`transforms`).
"""
import os

from patchcore_jax import errors
from patchcore_jax.data.common import check_split, Sample, Split, iterate_batches
from patchcore_jax.data.folder import folder_split
from patchcore_jax.data.mtd import mtd_split
from patchcore_jax.data.mvtec import MVTEC_CATEGORIES, mvtec_split
from patchcore_jax.data.synthetic import make_synthetic_dataset, SYNTHETIC_CATEGORIES
from patchcore_jax.data.transforms import load_image, load_mask


DATASETS = ('mvtec', 'mtd', 'folder', 'synthetic')


def get_splits(data_config):
  """{category: Split} for a `config.data` (fields: name, root, categories)."""
  name, root = data_config.name, data_config.root
  if not root:
    raise errors.UserError(f'config.data.root is empty: set --config.data.root=PATH for {name!r}')
  if name != 'synthetic' and not os.path.isdir(root):
    raise errors.UserError(f'config.data.root={root!r}: no such folder')
  if name == 'mvtec':
    return {c: mvtec_split(root, c) for c in data_config.categories}
  if name == 'mtd':
    return {'mtd': mtd_split(root)}
  if name == 'folder':
    split = folder_split(root)
    return {split.name: split}
  if name == 'synthetic':
    return {c: folder_split(make_synthetic_dataset(root, c), name=c)
            for c in data_config.categories}
  raise errors.UserError(f'config.data.name={name!r} is not allowed: must be one of {DATASETS}')
