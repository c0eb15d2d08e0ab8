"""Datasets as lists of samples, and host-side image loading.

`get_splits(config.data)` returns {category: Split}; `iterate_batches` loads images (and masks)
in a thread pool with the reference preprocessing (`transforms`).
"""
from patchcore_jax.data.common import Sample, Split, iterate_batches
from patchcore_jax.data.folder import folder_split
from patchcore_jax.data.mtd import mtd_split
from patchcore_jax.data.mvtec import MVTEC_CATEGORIES, mvtec_split
from patchcore_jax.data.synthetic import make_synthetic_dataset, SYNTHETIC_CATEGORIES
from patchcore_jax.data.transforms import load_image, load_mask


def get_splits(data_config):
  """{category: Split} for a `config.data` (fields: name, root, categories)."""
  name, root = data_config.name, data_config.root
  if not root:
    raise ValueError(f'config.data.root is empty: set --config.data.root=PATH for {name!r}')
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
  raise ValueError(f'unknown dataset {name!r}; known: mvtec, mtd, folder, synthetic')
