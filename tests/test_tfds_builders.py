"""TFDS builders: the same samples, bytes, pixels and results as the folder loaders."""
import os

import numpy as np
import pytest

from patchcore_jax import data
from patchcore_jax import errors
from tests.conftest import write_image as _write
from tests.conftest import write_tiny_folder as _folder



def _data_config(name, root, data_dir, source='tfds', categories=()):
  return data.DataSpec(name=name, root=root, categories=tuple(categories), source=source,
                       tfds_data_dir=data_dir)


def _same_samples(tfds_split, folder_split):
  assert tfds_split.name == folder_split.name
  for ours, theirs in ((tfds_split.train, folder_split.train), (tfds_split.test, folder_split.test)):
    assert [(tfds_split.relative(s.path), s.label, s.defect) for s in ours] == [
        (folder_split.relative(s.path), s.label, s.defect) for s in theirs]
    assert [s.mask_path and tfds_split.relative(s.mask_path) for s in ours] == [
        s.mask_path and folder_split.relative(s.mask_path) for s in theirs]
    for a, b in zip(ours, theirs):  # The very same bytes.
      with open(b.path, 'rb') as f:
        assert data.open_file(a, a.path).getvalue() == f.read()


def test_folder_dataset_has_the_same_samples_bytes_and_pixels(tmp_path):
  root = _folder(str(tmp_path / 'parts'), np.random.default_rng(0))
  folder = data.get_splits(_data_config('folder', root, '', source='folder'))['parts']
  info = {}
  tfds_split = data.get_splits(_data_config('folder', root, str(tmp_path / 'tfds')), info)['parts']
  _same_samples(tfds_split, folder)
  assert info['parts']['tfds_name'] == 'anomaly_folder/parts'
  assert info['parts']['build_seconds'] > 0 and info['parts']['dataset_bytes'] > 0
  assert os.path.isfile(os.path.join(info['parts']['tfds_path'],
                                     'anomaly_folder-test.array_record-00000-of-00001'))
  unmasked = [[s.relative(x.path) for x in data.check_split(s)] for s in (tfds_split, folder)]
  assert unmasked[0] == unmasked[1] == ['parts/test/crack/002.png']
  image_config = dict(resize=32, image_size=32, transform='resize_crop')
  loaded = [list(data.iterate_batches(s.test, batch_size=4, image_config=image_config,
                                      with_masks=True)) for s in (tfds_split, folder)]
  for a, b in zip(*loaded):
    assert a.count == b.count
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.masks, b.masks)
  assert sum(b.masks.sum() for b in loaded[0]) > 0  # The masks came through.
  # Built once: a second call reads it (no build), also without the files' folder.
  again = data.get_splits(_data_config('folder', root, str(tmp_path / 'tfds')), info)['parts']
  assert info['parts']['build_seconds'] == 0.0
  _same_samples(again, folder)


def test_mvtec_and_mtd_builders_keep_the_loaders_protocol(tmp_path):
  rng = np.random.default_rng(1)
  mvtec = str(tmp_path / 'mvtec')
  _folder(os.path.join(mvtec, 'bottle'), rng)
  _folder(os.path.join(mvtec, 'screw'), rng)
  configs = [_data_config('mvtec', mvtec, str(tmp_path / 'tfds'), source=s,
                          categories=('bottle', 'screw')) for s in ('tfds', 'folder')]
  ours, theirs = (data.get_splits(c) for c in configs)
  assert list(ours) == list(theirs) == ['bottle', 'screw']
  for category in ours:
    _same_samples(ours[category], theirs[category])
  assert ours['bottle'].relative(ours['bottle'].train[0].path) == 'bottle/train/good/000.png'

  mtd = str(tmp_path / 'mtd')
  for i in range(7):
    _write(os.path.join(mtd, 'MT_Free', 'Imgs', f'exp{i}.jpg'),
           rng.integers(0, 256, (30, 44), dtype=np.uint8), quality=90)
    _write(os.path.join(mtd, 'MT_Free', 'Imgs', f'exp{i}.png'), np.zeros((30, 44), np.uint8))
  for defect in ('MT_Crack', 'MT_Uneven'):
    _write(os.path.join(mtd, defect, 'Imgs', 'exp9.jpg'),
           rng.integers(0, 256, (30, 44), dtype=np.uint8), quality=90)
    _write(os.path.join(mtd, defect, 'Imgs', 'exp9.png'), np.full((30, 44), 255, np.uint8))
  configs = [_data_config('mtd', mtd, str(tmp_path / 'tfds'), source=s) for s in ('tfds', 'folder')]
  ours, theirs = (data.get_splits(c)['mtd'] for c in configs)
  _same_samples(ours, theirs)
  assert [len(ours.train), len(ours.test)] == [5, 4]  # Names 0 and 5 of 7 are test images.


def test_unbuilt_or_stale_datasets_are_refused_by_name(tmp_path):
  root = _folder(str(tmp_path / 'parts'), np.random.default_rng(2))
  data_dir = str(tmp_path / 'tfds')
  with pytest.raises(errors.UserError, match='mvtec_ad/bottle is not built under .*'
                     'set config.data.root'):
    data.get_splits(_data_config('mvtec', '', data_dir, categories=('bottle',)))
  with pytest.raises(errors.UserError, match='config.data.root is empty'):
    data.get_splits(_data_config('folder', '', data_dir))
  with pytest.raises(errors.UserError, match="config.data.source='tf' is not allowed"):
    data.get_splits(_data_config('folder', root, data_dir, source='tf'))
  data.get_splits(_data_config('folder', root, data_dir))
  _write(os.path.join(root, 'test', 'crack', '009.png'), np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(errors.UserError, match='built from other files than .*parts.*delete that '
                     'folder to rebuild it'):
    data.get_splits(_data_config('folder', root, data_dir))


def test_a_run_from_tfds_equals_the_run_from_files(tmp_path):
  """experiment.run on both sources: the same results and the same scores file."""
  from configs import folder as folder_config  # pylint: disable=g-import-not-at-top
  from patchcore_jax.jobs import experiment  # pylint: disable=g-import-not-at-top
  root = _folder(str(tmp_path / 'parts'), np.random.default_rng(3), size=(64, 64))
  results = {}
  for source in ('folder', 'tfds'):
    config = folder_config.get_config()
    config.data.root = root
    config.data.source = source
    config.data.tfds_data_dir = str(tmp_path / 'tfds')
    config.data.image_size = config.data.resize = 64
    config.output.num_overlays = 2
    results[source] = experiment.run(config, str(tmp_path / source))['parts']
  keys = ('image_auroc', 'pixel_auroc', 'au_pro', 'memory_bank_size', 'image_threshold')
  assert {k: results['tfds'][k] for k in keys} == {k: results['folder'][k] for k in keys}
  assert 'data' in results['tfds'] and 'data' not in results['folder']
  read = lambda source: open(tmp_path / source / 'scores' / 'parts.csv').read()
  assert read('tfds') == read('folder')
  assert sorted(os.listdir(tmp_path / 'tfds' / 'maps' / 'parts')) == sorted(
      os.listdir(tmp_path / 'folder' / 'maps' / 'parts'))
