"""Datasets as lists of samples, and host-side image loading.

`get_splits(DataSpec(...))` returns {category: Split}; `iterate_batches` and `image_batches`
load images (and masks) in a thread pool with the reference preprocessing (`transforms`) as
zero-padded `Batch`es. `DataSpec.source` says where the files come from: 'folder' (the files
under `root`) or 'tfds' (the same files as TFDS `array_record` datasets, built from `root` on
first use: `tfds_builders`).
"""
import dataclasses
import os
from typing import Tuple

from patchcore_jax import errors
from patchcore_jax.data.common import Batch, check_split, image_batches, iterate_batches
from patchcore_jax.data.common import to_device
from patchcore_jax.data.common import open_file, Sample, Split
from patchcore_jax.data.folder import folder_split
from patchcore_jax.data.mtd import mtd_split
from patchcore_jax.data.mvtec import MVTEC_CATEGORIES, mvtec_split, resolve_categories
from patchcore_jax.data.synthetic import make_synthetic_dataset, SYNTHETIC_CATEGORIES
from patchcore_jax.data.transforms import load_image, load_mask


DATASETS = ('mvtec', 'mtd', 'folder', 'synthetic')
SOURCES = ('folder', 'tfds')


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which dataset to read, and from where.

  name: one of DATASETS ('mvtec', 'mtd', 'folder', 'synthetic').
  root: the dataset's folder (mvtec: the folder holding the category folders; synthetic: where
    the generated data is written once).
  categories: mvtec or synthetic categories; ('all',): every MVTec category under `root`.
  source: 'folder' (the files) or 'tfds' (array_record datasets built from them).
  tfds_data_dir: TFDS's data dir ('': $TFDS_DATA_DIR or ~/tensorflow_datasets).
  """
  name: str = 'mvtec'
  root: str = ''
  categories: Tuple[str, ...] = ('bottle',)
  source: str = 'folder'
  tfds_data_dir: str = ''


def get_splits(spec, info=None):
  """{category: Split} for a `DataSpec`. `info`: a dict that, for source 'tfds', receives
  {category: {'tfds_name', 'tfds_path', 'build_seconds', 'dataset_bytes'}}."""
  if spec.source == 'tfds':
    return _tfds_splits(spec, {} if info is None else info)
  if spec.source != 'folder':
    raise errors.UserError(f'config.data.source={spec.source!r} is not allowed: must be '
                           f'one of {SOURCES}')
  name, root = spec.name, spec.root
  if not root:
    raise errors.UserError(f'config.data.root is empty: set --config.data.root=PATH for {name!r}')
  if name != 'synthetic' and not os.path.isdir(root):
    raise errors.UserError(f'config.data.root={root!r}: no such folder')
  if name == 'mvtec':
    return {c: mvtec_split(root, c) for c in resolve_categories(spec.categories, root)}
  if name == 'mtd':
    return {'mtd': mtd_split(root)}
  if name == 'folder':
    split = folder_split(root)
    return {split.name: split}
  if name == 'synthetic':
    return {c: folder_split(make_synthetic_dataset(root, c), name=c)
            for c in spec.categories}
  raise errors.UserError(f'config.data.name={name!r} is not allowed: must be one of {DATASETS}')


def _tfds_splits(spec, info):
  from patchcore_jax.data import tfds_builders  # pylint: disable=g-import-not-at-top
  name, root = spec.name, spec.root
  if root and not os.path.isdir(root):
    raise errors.UserError(f'config.data.root={root!r}: no such folder')
  if name == 'mvtec':
    if tuple(spec.categories) == ('all',) and not root:
      raise errors.UserError('config.data.categories=(\'all\',) needs config.data.root: the '
                             'categories present there are the ones run')
    categories = resolve_categories(spec.categories, root)
  elif name == 'mtd':
    categories = ('mtd',)
  elif name == 'folder':
    if not root:
      raise errors.UserError('config.data.root is empty: for data.name=\'folder\' it names the '
                             'folder (whose name is the TFDS dataset\'s config)')
    categories = (os.path.basename(os.path.normpath(root)),)
  elif name == 'synthetic':
    categories = tuple(spec.categories)
  else:
    raise errors.UserError(f'config.data.name={name!r} is not allowed: must be one of {DATASETS}')
  splits = {}
  for category in categories:
    manual_dir = root
    if name == 'synthetic':
      manual_dir = make_synthetic_dataset(root, category)
    tfds_name, path, seconds = tfds_builders.prepare(
        name, category, manual_dir=manual_dir, data_dir=spec.tfds_data_dir)
    splits[category] = tfds_builders.tfds_split(tfds_name, data_dir=spec.tfds_data_dir,
                                                category=category)
    info[category] = dict(tfds_name=tfds_name, tfds_path=path, build_seconds=seconds,
                          dataset_bytes=tfds_builders.dataset_size(path))
  return splits
