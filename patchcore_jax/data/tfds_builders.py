"""TFDS builders for MVTec AD, Magnetic Tile Defects and any folder in MVTec AD's layout.

Nothing is downloaded: each builder reads the user's files from `manual_dir` (the same folder
`data.root` names for the folder loaders), lists them with the very same functions
(`mvtec_split`, `mtd_split`, `folder_split`), and writes `array_record` files that
`tfds.data_source` reads back by random access, without TensorFlow.

  builder                  config                 manual_dir
  mvtec_ad                 one per category (15)  the folder holding the category folders
  magnetic_tile_defects    -                      the MTD release folder (MT_Free, MT_Blowhole, ...)
  anomaly_folder           the folder's name      a folder in MVTec AD's layout (data.folder)

Each example is one file as it is on disk, so both sources decode the same bytes the same way:
  image      bytes   the image file (PNG, JPEG, ...)
  mask       bytes   its mask file, b'' when it has none
  path       text    the image's path relative to the split's root (as in scores/<category>.csv)
  mask_path  text    the mask's path likewise, '' when none
  label      int64   0 good, 1 anomalous
  defect     text    'good' or the defect type
Splits 'train' and 'test' keep the folder loader's order (shuffling is disabled), so a run on
either source sees the same images in the same order and gives the same numbers.

Without TensorFlow, `tfds.features.Image` cannot encode; bytes tensors and text can, and keeping
the original file avoids decoding at build time entirely (and keeps the dataset the size of the
files). The builder records a fingerprint of the listed files (relative names and sizes) in the
dataset's metadata; reading with `data.root` set checks it, so a dataset built from other files
is refused rather than silently used (rebuild by deleting its folder, named in the message).

  splits = data.get_splits(data.DataSpec(name, root, source='tfds'))  # Builds when needed.
"""
import hashlib
import os
import time

from absl import logging
import numpy as np

from patchcore_jax import errors
from patchcore_jax.data import common
from patchcore_jax.data.folder import folder_split
from patchcore_jax.data.mtd import mtd_split
from patchcore_jax.data.mvtec import MVTEC_CATEGORIES, mvtec_split

import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

VERSION = '1.0.0'
FILE_FORMAT = 'array_record'


def fingerprint(split):
  """A hash of the split's files: their paths relative to `split.root` and their sizes."""
  digest = hashlib.sha256()
  for part, samples in (('train', split.train), ('test', split.test)):
    for s in samples:
      for path in (s.path, s.mask_path):
        if path:
          digest.update(f'{part}\0{os.path.relpath(path, split.root)}\0'
                        f'{os.path.getsize(path)}\n'.encode())
  return digest.hexdigest()


def _read(path):
  with open(path, 'rb') as f:
    return f.read()


class _AnomalyBuilder(tfds.core.GeneratorBasedBuilder):
  """Common part: the features, the two splits, the examples, the fingerprint."""

  VERSION = tfds.core.Version(VERSION)
  MANUAL_DOWNLOAD_INSTRUCTIONS = 'Pass the dataset\'s folder as manual_dir (config data.root).'

  def _folder_split(self, manual_dir):
    raise NotImplementedError

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self,
        description=self.__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Tensor(shape=(), dtype=np.object_),
            'mask': tfds.features.Tensor(shape=(), dtype=np.object_),
            'path': tfds.features.Text(),
            'mask_path': tfds.features.Text(),
            'label': tfds.features.Scalar(dtype=np.int64),
            'defect': tfds.features.Text(),
        }),
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    split = self._folder_split(os.fspath(dl_manager.manual_dir))
    self.info.metadata['fingerprint'] = fingerprint(split)
    return {'train': self._generate_examples(split, split.train),
            'test': self._generate_examples(split, split.test)}

  def _generate_examples(self, split, samples):
    for i, s in enumerate(samples):
      yield f'{i:06d}', {
          'image': _read(s.path),
          'mask': _read(s.mask_path) if s.mask_path else b'',
          'path': os.path.relpath(s.path, split.root),
          'mask_path': os.path.relpath(s.mask_path, split.root) if s.mask_path else '',
          'label': s.label,
          'defect': s.defect,
      }


class MvtecAd(_AnomalyBuilder):
  """MVTec AD (Bergmann et al., CVPR 2019), one config per category; manual_dir holds the
  category folders in the official layout."""

  BUILDER_CONFIGS = [tfds.core.BuilderConfig(name=c) for c in MVTEC_CATEGORIES]

  def _folder_split(self, manual_dir):
    return mvtec_split(manual_dir, self.builder_config.name)


class MagneticTileDefects(_AnomalyBuilder):
  """Magnetic Tile Defects (Huang et al., 2018) with the project's split (data.mtd); manual_dir
  is the release folder."""

  def _folder_split(self, manual_dir):
    return mtd_split(manual_dir)


class AnomalyFolder(_AnomalyBuilder):
  """Any folder in MVTec AD's layout (data.folder); the config's name is the folder's name."""

  def _folder_split(self, manual_dir):
    return folder_split(manual_dir, name=self.builder_config.name)


class _Record:
  """One example of a data source as a `Sample.source`: read(name) -> that file's bytes."""

  __slots__ = ('_source', '_index')

  def __init__(self, source, index):
    self._source, self._index = source, index

  def read(self, name):
    example = self._source[self._index]
    if name == _text(example['path']):
      return example['image']
    if name == _text(example['mask_path']):
      return example['mask']
    raise KeyError(f'{name!r} is not a file of example {self._index}')


def _text(value):
  return value.decode() if isinstance(value, bytes) else str(value)


def dataset_name(data_name, category):
  """The TFDS name ('builder/config') of a config's dataset and category."""
  if data_name == 'mvtec':
    return f'mvtec_ad/{category}'
  if data_name == 'mtd':
    return 'magnetic_tile_defects'
  return f'anomaly_folder/{category}'  # 'folder' and 'synthetic'.


def _builder(data_name, category, data_dir):
  kwargs = dict(data_dir=data_dir or None, file_format=FILE_FORMAT)
  if data_name == 'mvtec':
    return MvtecAd(config=category, **kwargs)
  if data_name == 'mtd':
    return MagneticTileDefects(**kwargs)
  return AnomalyFolder(config=tfds.core.BuilderConfig(name=category), **kwargs)


def prepare(data_name, category, *, manual_dir, data_dir):
  """Builds the dataset unless it is there; checks a built one against `manual_dir`'s files.

  Args:
    data_name: 'mvtec', 'mtd', 'folder' or 'synthetic' (config.data.name).
    category: the MVTec category, or the folder's name ('mtd' for MTD).
    manual_dir: the user's files ('' or None: use a built dataset as it is).
    data_dir: where TFDS datasets live ('' or None: TFDS's default, $TFDS_DATA_DIR or
      ~/tensorflow_datasets).
  Returns:
    (TFDS name, the builder's data folder, seconds spent building (0.0 when it was there)).
  Raises:
    errors.UserError: not built and no manual_dir; built from other files.
  """
  name = dataset_name(data_name, category)
  builder = _builder(data_name, category, data_dir)
  path = os.fspath(builder.data_path)
  built = os.path.isfile(os.path.join(path, 'dataset_info.json'))
  if manual_dir and built:
    split = _folder_split(data_name, category, manual_dir)
    if builder.info.metadata.get('fingerprint') != fingerprint(split):
      raise errors.UserError(
          f'the TFDS dataset {name} at {path} was built from other files than {manual_dir} '
          '(their names or sizes differ): delete that folder to rebuild it')
  if built:
    return name, path, 0.0
  if not manual_dir:
    raise errors.UserError(f'the TFDS dataset {name} is not built under {path}: set '
                           'config.data.root to the dataset\'s folder to build it')
  logging.info('building TFDS dataset %s from %s into %s', name, manual_dir, path)
  start = time.perf_counter()
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return name, path, time.perf_counter() - start


def _folder_split(data_name, category, root):
  if data_name == 'mvtec':
    return mvtec_split(root, category)
  if data_name == 'mtd':
    return mtd_split(root)
  return folder_split(root, name=category)


def tfds_split(name, *, data_dir, category):
  """The `Split` of a built dataset, read with `tfds.data_source` (no file but the records)."""
  splits = {}
  for part in ('train', 'test'):
    source = tfds.data_source(name, split=part, data_dir=data_dir or None)
    samples = []
    for i in range(len(source)):
      example = source[i]  # The image bytes come along; cheap next to decoding them later.
      mask_path = _text(example['mask_path'])
      samples.append(common.Sample(_text(example['path']), int(example['label']),
                                   _text(example['defect']), mask_path or None,
                                   source=_Record(source, i)))
    splits[part] = samples
  return common.Split(category, '', splits['train'], splits['test'])  # Paths: already relative.


def dataset_size(path):
  """Bytes of a built dataset's files."""
  return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
