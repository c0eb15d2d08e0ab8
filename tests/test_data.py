"""Data layouts, split protocols and the reference preprocessing."""
import os

import jax
import numpy as np
from PIL import Image
import pytest

from patchcore_jax import data
from patchcore_jax import errors
from patchcore_jax.data import transforms
from tests.conftest import shared_path


def _write(path, array, mode=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array, mode).save(path)


def test_resize_crop_follows_torchvision_semantics(tmp_path):
  rng = np.random.default_rng(0)
  array = rng.integers(0, 256, (600, 900, 3), dtype=np.uint8)
  _write(str(tmp_path / 'a.png'), array)
  ours = transforms.load_image(str(tmp_path / 'a.png'), resize=256, image_size=224)
  # Resize(256): shorter side 600 -> 256, longer int(256 * 900 / 600) = 384; crop at (16, 80).
  ref = Image.fromarray(array).resize((384, 256), Image.BILINEAR).crop((80, 16, 304, 240))
  np.testing.assert_array_equal(ours, np.asarray(ref, np.float32) / 255.0)
  assert ours.shape == (224, 224, 3) and ours.dtype == np.float32


def test_plain_resize_keeps_the_whole_image(tmp_path):
  array = np.zeros((100, 300), np.uint8)
  array[:, :10] = 255  # A stripe at the left border that a centre crop would cut.
  _write(str(tmp_path / 'g.png'), array)
  ours = transforms.load_image(str(tmp_path / 'g.png'), image_size=64, transform='resize')
  assert ours.shape == (64, 64, 3)
  assert ours[:, 0].min() > 0.9  # Stripe kept.
  np.testing.assert_array_equal(ours[..., 0], ours[..., 2])  # Grayscale -> 3 equal channels.
  with pytest.raises(ValueError):
    transforms.load_image(str(tmp_path / 'g.png'), transform='squash')


def test_rgba_and_palette_become_rgb(tmp_path):
  rgba = np.zeros((8, 8, 4), np.uint8)
  rgba[..., 0] = 200
  rgba[..., 3] = 10
  _write(str(tmp_path / 'rgba.png'), rgba)
  out = transforms.load_image(str(tmp_path / 'rgba.png'), image_size=8, transform='resize')
  np.testing.assert_allclose(out[0, 0], [200 / 255, 0, 0])
  Image.fromarray(rgba[..., :3]).convert('P').save(str(tmp_path / 'p.png'))
  assert transforms.load_image(str(tmp_path / 'p.png'), image_size=8,
                               transform='resize').shape == (8, 8, 3)


def test_mask_threshold_is_half(tmp_path):
  mask = np.array([[0, 127, 128, 255]], np.uint8).repeat(4, 0)
  _write(str(tmp_path / 'm.png'), mask)
  out = transforms.load_mask(str(tmp_path / 'm.png'), image_size=4, transform='resize')
  np.testing.assert_array_equal(out[0], [False, False, True, True])


def _make_folder(root):
  img = np.full((32, 32, 3), 128, np.uint8)
  for i in range(3):
    _write(f'{root}/train/good/{i:03d}.png', img)
  _write(f'{root}/test/good/000.png', img)
  _write(f'{root}/test/scratch/000.jpg', img)
  _write(f'{root}/test/scratch/001.png', img)
  _write(f'{root}/test/dent/000.png', img)
  _write(f'{root}/ground_truth/scratch/000_mask.png', np.full((32, 32), 255, np.uint8))
  open(f'{root}/test/scratch/notes.txt', 'w').close()


def test_folder_layout(tmp_path):
  root = str(tmp_path / 'my_parts')
  _make_folder(root)
  split = data.folder_split(root)
  assert split.name == 'my_parts' and len(split.train) == 3
  assert [(os.path.basename(s.path), s.label, s.defect) for s in split.test] == [
      ('000.png', 1, 'dent'), ('000.png', 0, 'good'), ('000.jpg', 1, 'scratch'),
      ('001.png', 1, 'scratch')]
  assert split.test[2].mask_path.endswith('ground_truth/scratch/000_mask.png')
  assert split.test[3].mask_path is None and split.has_masks


def test_iterate_batches_pads_the_last_batch(tmp_path):
  root = str(tmp_path / 'parts')
  _make_folder(root)
  split = data.folder_split(root)
  config = dict(resize=32, image_size=16, transform='resize_crop')
  out = list(data.iterate_batches(split.test, batch_size=3, image_config=config, with_masks=True))
  assert [b.count for b in out] == [3, 1]
  assert out[1].images.shape == (3, 16, 16, 3) and out[1].masks.shape == (3, 16, 16)
  assert not out[1].images[1:].any()  # Padding.
  assert out[0].masks[2].all()  # scratch/000 has a full mask; good and dent have none.
  assert not out[0].masks[:2].any()
  unmasked = list(data.iterate_batches(split.test, batch_size=3, image_config=config))
  assert unmasked[0].masks is None
  np.testing.assert_array_equal(unmasked[1].images, out[1].images)


@pytest.mark.parametrize('prefetch', [0, 2])
def test_map_in_batches_decodes_ahead_only_when_asked(prefetch):
  """prefetch=0 (the CPU default): nothing of batch i + 1 is loaded while the consumer holds
  batch i; prefetch=2: the next batches load meanwhile. Order and values are the same."""
  import threading  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  from patchcore_jax.data import common  # pylint: disable=g-import-not-at-top
  lock, calls = threading.Lock(), []

  def fn(item):
    with lock:
      calls.append(item)
    return item * 10

  out = []
  for i, loaded in enumerate(common.map_in_batches(fn, list(range(7)), batch_size=2,
                                                   num_workers=2, prefetch=prefetch)):
    out.extend(value for _, value, _ in loaded)
    later = set(range(2 * i + 2, min(2 * i + 2 + 2 * prefetch, 7)))
    deadline = time.time() + (5.0 if later else 0.2)
    while time.time() < deadline:
      with lock:
        if later and later <= set(calls):
          break
      time.sleep(0.01)
    with lock:
      assert set(calls) == set(range(min(2 * i + 2, 7))) | later, (i, calls)
  assert out == [10 * i for i in range(7)]
  assert common.default_prefetch() == (0 if jax.default_backend() == 'cpu' else 2)


def test_mvtec_bottle_layout():
  root = shared_path('data', 'mvtec_ad')
  split = data.mvtec_split(root, 'bottle')
  assert len(split.train) == 209 and len(split.test) == 83
  assert sum(s.label for s in split.test) == 63
  assert all(s.mask_path for s in split.test if s.label)
  with pytest.raises(errors.UserError, match='unknown MVTec AD category'):
    data.mvtec_split(root, 'bottles')
  assert len(data.MVTEC_CATEGORIES) == 15


def test_mtd_protocol():
  split = data.mtd_split(shared_path('data', 'mtd'))
  assert len(split.train) == 761 and len(split.test) == 583
  assert sum(1 - s.label for s in split.test) == 191
  free = sorted(os.path.basename(s.path) for s in split.test if s.label == 0)
  names = sorted(os.listdir(os.path.join(shared_path('data', 'mtd'), 'MT_Free', 'Imgs')))
  names = sorted(n for n in names if n.endswith('.jpg'))
  assert free == sorted(n for i, n in enumerate(names) if i % 5 == 0)
  assert sum(1 for s in split.test if s.label and s.mask_path) == 392


def test_synthetic_dataset_is_deterministic(tmp_path):
  a = data.make_synthetic_dataset(str(tmp_path / 'a'), 'tiles')
  b = data.make_synthetic_dataset(str(tmp_path / 'b'), 'tiles')
  split = data.folder_split(a)
  assert len(split.train) == 60 and len(split.test) == 51 and split.has_masks
  for rel in ('train/good/007.png', 'test/crack/003.png', 'ground_truth/stain/002_mask.png'):
    np.testing.assert_array_equal(np.asarray(Image.open(os.path.join(a, rel))),
                                  np.asarray(Image.open(os.path.join(b, rel))))
  masks = [np.asarray(Image.open(s.mask_path)) for s in split.test if s.label]
  assert all(m.any() for m in masks)  # Every defect is marked.


def test_all_mvtec_categories_means_those_present(tmp_path):
  from patchcore_jax.data import mvtec  # pylint: disable=g-import-not-at-top
  for name in ('screw', 'bottle', 'not_a_category'):
    (tmp_path / name).mkdir()
  assert mvtec.resolve_categories(('all',), str(tmp_path)) == ('bottle', 'screw')
  assert mvtec.resolve_categories(('screw',), str(tmp_path)) == ('screw',)
  with pytest.raises(errors.UserError, match='no MVTec AD category folder under'):
    mvtec.present_categories(str(tmp_path / 'not_a_category'))


def test_device_copies_are_issued_ahead_of_the_consumer():
  """to_device(ahead=2): when batch i is handed out, batches i + 1 and i + 2 have been put on the
  device; order and values unchanged; ahead=0 (the CPU default) hands the batches through."""
  from patchcore_jax.data import common  # pylint: disable=g-import-not-at-top
  pulled = []

  def source():
    for i in range(5):
      pulled.append(i)
      yield common.Batch(np.full((2, 4, 4, 3), i, np.float32), 2, np.zeros((2, 4, 4), bool))

  for i, batch in enumerate(common.to_device(source(), ahead=2)):
    assert isinstance(batch.images, jax.Array) and isinstance(batch.masks, np.ndarray)
    assert float(batch.images[0, 0, 0, 0]) == i
    assert pulled == list(range(min(i + 3, 5)))
  same = list(common.to_device(iter([common.Batch(np.ones((1, 2, 2, 3)), 1)]), ahead=0))
  assert isinstance(same[0].images, np.ndarray)
  assert common.default_device_prefetch() == (0 if jax.default_backend() == 'cpu' else 2)


def test_decode_workers_per_backend(monkeypatch):
  from patchcore_jax.data import common  # pylint: disable=g-import-not-at-top
  assert common.decode_workers(5) == 5
  monkeypatch.setattr(common.jax, 'default_backend', lambda: 'cpu')
  assert common.decode_workers(0) == 2
  monkeypatch.setattr(common.jax, 'default_backend', lambda: 'gpu')
  monkeypatch.setattr(common.os, 'cpu_count', lambda: 64)
  assert common.decode_workers(0) == 16
  monkeypatch.setattr(common.os, 'cpu_count', lambda: 1)
  assert common.decode_workers(0) == 2
