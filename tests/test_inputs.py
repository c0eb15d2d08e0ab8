"""Hostile and broken inputs: every image format decodes as a person sees it, every broken file or
config value is refused early with a message naming it, and workdirs never lie.

Each test here backs a row of the "Inputs and errors" table in docs/running.md.
"""
import csv
import json
import logging
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image
import pytest

from configs import mvtec
from patchcore_jax import backbones
from patchcore_jax import data
from patchcore_jax import errors
from patchcore_jax.jobs import config as config_lib
from patchcore_jax.jobs import experiment
from patchcore_jax.data import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = dict(resize=64, image_size=64, transform='resize')


def _gradient(h=48, w=64):
  y, x = np.mgrid[0:h, 0:w]
  return np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (h + w - 2)],
                  axis=-1).astype(np.uint8)


def _png(path, width, height, bit_depth, color_type, raw_rows):
  """A PNG written byte by byte (PIL cannot write 16-bit RGB or a lying header)."""
  def chunk(kind, body):
    return (struct.pack('>I', len(body)) + kind + body +
            struct.pack('>I', zlib.crc32(kind + body) & 0xffffffff))
  ihdr = struct.pack('>IIBBBBB', width, height, bit_depth, color_type, 0, 0, 0)
  with open(path, 'wb') as f:
    f.write(b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(raw_rows))
            + chunk(b'IEND', b''))


def _load(path):
  return transforms.load_image(str(path), **CONFIG)


def _expected(rgb_uint8):
  """What load_image must give for an 8-bit RGB picture of the file."""
  return np.asarray(Image.fromarray(rgb_uint8).resize((64, 64), Image.BILINEAR),
                    np.float32) / 255.0


# ---------------------------------------------------------------------------------- Formats.


def test_16_bit_grayscale_png_uses_its_full_range(tmp_path):
  values = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
  Image.fromarray(values).save(tmp_path / 'g16.png')
  assert Image.open(tmp_path / 'g16.png').mode.startswith('I')
  ours = _load(tmp_path / 'g16.png')
  eight = np.round(values / 65535.0 * 255).astype(np.uint8)
  np.testing.assert_allclose(ours, _expected(np.stack([eight] * 3, -1)), atol=1 / 255)
  assert 0.3 < ours.mean() < 0.7  # Not saturated white, as convert('RGB') made it.


def test_16_bit_rgb_png(tmp_path):
  rgb8 = _gradient()
  rgb16 = rgb8.astype(np.uint16) * 257
  rows = b''.join(b'\x00' + row.astype('>u2').tobytes() for row in rgb16)
  _png(tmp_path / 'rgb16.png', 64, 48, 16, 2, rows)
  np.testing.assert_allclose(_load(tmp_path / 'rgb16.png'), _expected(rgb8), atol=1 / 255)


@pytest.mark.parametrize('kind', ['rgba', 'cmyk', 'palette', 'tiff8', 'webp', 'bmp', 'gray'])
def test_8_bit_formats_load_as_displayed(tmp_path, kind):
  rgb = _gradient()
  img = Image.fromarray(rgb)
  path = tmp_path / f'{kind}.{dict(tiff8="tif", webp="webp", bmp="bmp").get(kind, "png")}'
  if kind == 'rgba':
    img.putalpha(Image.fromarray((np.arange(48 * 64) % 256).reshape(48, 64).astype(np.uint8)))
    path = tmp_path / 'rgba.png'
  elif kind == 'cmyk':
    img = img.convert('CMYK')
    path = tmp_path / 'cmyk.tif'
  elif kind == 'palette':
    img = img.convert('P', palette=Image.Palette.ADAPTIVE, colors=64)
  elif kind == 'gray':
    img = img.convert('L')
  img.save(path, **({'lossless': True} if kind == 'webp' else {}))
  shown = np.asarray(Image.open(path).convert('RGB'))  # What a viewer shows (alpha ignored).
  np.testing.assert_array_equal(_load(path), _expected(shown))
  if kind in ('webp', 'bmp', 'tiff8', 'rgba'):
    np.testing.assert_array_equal(shown, rgb)  # Lossless: the same pixels as written.


def test_16_and_32_bit_tiffs(tmp_path, caplog):
  values = np.linspace(0, 1, 48 * 64).reshape(48, 64)
  Image.fromarray((values * 65535).astype(np.uint16)).save(tmp_path / 'i16.tif')
  Image.fromarray(values.astype(np.float32)).save(tmp_path / 'f32.tif')
  Image.fromarray((values * 4000 - 1000).astype(np.float32)).save(tmp_path / 'f32_wide.tif')
  Image.fromarray((values * 1e6).astype(np.int32)).save(tmp_path / 'i32.tif')
  gray = np.round(values * 255).astype(np.uint8)
  expected = _expected(np.stack([gray] * 3, -1))
  for name in ('i16.tif', 'f32.tif'):
    np.testing.assert_allclose(_load(tmp_path / name), expected, atol=1.01 / 255)
  caplog.set_level(logging.WARNING)
  for name in ('f32_wide.tif', 'i32.tif'):  # Outside [0, 1] / 16 bits: min-max, with a warning.
    np.testing.assert_allclose(_load(tmp_path / name), expected, atol=1.01 / 255)
    assert any(name in r.getMessage() and 'min-max' in r.getMessage() for r in caplog.records)


def test_exif_orientation_is_applied(tmp_path):
  rgb = _gradient()  # 48 x 64, landscape as stored.
  exif = Image.Exif()
  exif[0x0112] = 6  # "Rotate 90 CW to display": a portrait photo from a phone.
  Image.fromarray(rgb).save(tmp_path / 'phone.jpg', exif=exif, quality=100)
  shown = np.asarray(Image.open(tmp_path / 'phone.jpg').convert('RGB').transpose(
      Image.Transpose.ROTATE_270))
  assert shown.shape == (64, 48, 3)
  assert transforms.image_size_of(str(tmp_path / 'phone.jpg')) == (48, 64)
  np.testing.assert_array_equal(_load(tmp_path / 'phone.jpg'), _expected(shown))
  Image.fromarray(rgb).save(tmp_path / 'tagged.png', exif=exif)  # PNG's eXIf chunk too.
  assert transforms.image_size_of(str(tmp_path / 'tagged.png')) == (48, 64)
  np.testing.assert_array_equal(_load(tmp_path / 'tagged.png'), _expected(
      rgb.transpose(1, 0, 2)[:, ::-1]))


def test_decompression_bomb_is_refused_by_name(tmp_path):
  path = tmp_path / 'bomb.png'
  _png(path, 100000, 100000, 8, 0, b'\x00' * 16)  # Declares 10^10 pixels; a few bytes on disk.
  assert os.path.getsize(path) < 200
  with pytest.raises(transforms.ImageTooLarge, match=f'{path}.*pixels'):
    _load(path)


# ----------------------------------------------------------------------- Folders and files.


def _dataset(root, *, train=6, good=3, bad=3, masks=True, size=(64, 64)):
  """A tiny MVTec-layout folder of random pictures; defects are bright squares with masks."""
  rng = np.random.default_rng(0)
  def picture():
    return (rng.random(size + (3,)) * 80 + 80).astype(np.uint8)
  for i in range(train):
    os.makedirs(root / 'train' / 'good', exist_ok=True)
    Image.fromarray(picture()).save(root / 'train' / 'good' / f'{i:03d}.png')
  for i in range(good):
    os.makedirs(root / 'test' / 'good', exist_ok=True)
    Image.fromarray(picture()).save(root / 'test' / 'good' / f'{i:03d}.png')
  for i in range(bad):
    os.makedirs(root / 'test' / 'spot', exist_ok=True)
    img, mask = picture(), np.zeros(size, np.uint8)
    img[20:36, 20:36] = 250
    mask[20:36, 20:36] = 255
    Image.fromarray(img).save(root / 'test' / 'spot' / f'{i:03d}.png')
    if masks:
      os.makedirs(root / 'ground_truth' / 'spot', exist_ok=True)
      Image.fromarray(mask).save(root / 'ground_truth' / 'spot' / f'{i:03d}_mask.png')
  return root


def test_missing_empty_and_misspelt_folders(tmp_path):
  with pytest.raises(errors.UserError, match='no such folder'):
    data.folder_split(str(tmp_path / 'nope'))
  os.makedirs(tmp_path / 'empty' / 'train' / 'good')
  os.makedirs(tmp_path / 'empty' / 'test' / 'good')
  with pytest.raises(errors.UserError, match='found 0 training and 0 test images'):
    data.folder_split(str(tmp_path / 'empty'))
  os.makedirs(tmp_path / 'typo' / 'trian' / 'good')
  with pytest.raises(errors.UserError, match=r'no training images: .*train.*missing'):
    data.folder_split(str(tmp_path / 'typo'))


def test_good_folder_names_match_case_insensitively(tmp_path):
  root = _dataset(tmp_path / 'd')
  os.rename(root / 'test' / 'good', root / 'test' / 'Good')
  os.rename(root / 'train', root / 'Train')
  split = data.folder_split(str(root))
  assert len(split.train) == 6
  assert {s.defect for s in split.test} == {'good', 'spot'}
  assert sum(s.label for s in split.test) == 3


def test_broken_files_are_all_found_before_any_work(tmp_path):
  root = _dataset(tmp_path / 'd')
  good = root / 'test' / 'good'
  (good / 'zero.png').write_bytes(b'')
  (good / 'text.png').write_text('not an image')
  data_ = open(good / '000.png', 'rb').read()
  (good / 'truncated.png').write_bytes(data_[:len(data_) // 2])
  Image.fromarray(_gradient()).save(root / 'train' / 'good' / 'ok.jpg')
  jpeg = open(root / 'train' / 'good' / 'ok.jpg', 'rb').read()
  (root / 'train' / 'good' / 'cut.jpg').write_bytes(jpeg[:-100])
  _png(good / 'bomb.png', 100000, 100000, 8, 0, b'\x00' * 16)
  values = np.full((64, 64), 0.5, np.float32)
  values[0, :3] = np.nan
  Image.fromarray(values, 'F').save(root / 'train' / 'good' / 'nan.tiff')
  with pytest.raises(errors.UserError) as info:
    data.check_split(data.folder_split(str(root)))
  message = str(info.value)
  assert '6 unusable file(s)' in message, message
  for name, reason in (('zero.png', 'empty file'), ('text.png', 'not a readable image'),
                       ('truncated.png', 'truncated'), ('cut.jpg', 'truncated'),
                       ('bomb.png', 'too many pixels'),
                       ('nan.tiff', '3 of 4096 pixels are not finite (3 NaN, 0 infinite)')):
    assert any(name in line and reason in line for line in message.splitlines()), (name, message)


def test_mask_size_mismatch_is_refused_naming_both(tmp_path):
  root = _dataset(tmp_path / 'd')
  Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / 'ground_truth' / 'spot' / '001_mask.png')
  with pytest.raises(errors.UserError, match=r'001_mask\.png is 32 x 32 pixels, its image .*001\.png is 64 x 64'):
    data.check_split(data.folder_split(str(root)))


def _tiny_config(root, **overrides):
  from configs import folder  # pylint: disable=g-import-not-at-top
  config = folder.get_config('backbone=efficientnet_lite0')
  config.data.root = str(root)
  config.data.image_size = config.data.resize = 64
  config.data.batch_size = 4
  config.output.num_overlays = 2
  config.output.save_model = False
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  return config


def test_defective_image_without_mask_is_left_out_of_pixel_metrics(tmp_path):
  root = _dataset(tmp_path / 'd', bad=4)
  os.remove(root / 'ground_truth' / 'spot' / '002_mask.png')
  result = experiment.run(_tiny_config(root), str(tmp_path / 'out'))['d']
  assert result['num_excluded_from_pixel_metrics'] == 1
  assert result['excluded_from_pixel_metrics'] == ['d/test/spot/002.png']
  assert result['pixel_auroc'] is not None and result['num_test_images'] == 7


# --------------------------------------------------------------------------------- Configs.


@pytest.mark.parametrize('field, value, message', [
    ('coreset__percentage', 1.5, r'percentage \(coreset.percentage\) = 1.5 is not allowed: must be in \(0, 1\]'),
    ('coreset__percentage', 0.0, r'coreset.percentage\) = 0.0'),
    ('knn__k', 0, r'k \(knn.k\) = 0 is not allowed: must be at least 1'),
    ('data__batch_size', 0, r'batch_size \(data.batch_size\) = 0 is not allowed'),
    ('data__transform', 'squash', r"transform \(data.transform\) = 'squash'"),
    ('backbone__name', 'resnet_foo', r"config.backbone.name='resnet_foo' is not allowed: must be one of \('resnet18', .*'efficientnet_lite2'\)"),
    ('backbone__stages', ('layer2', 'layer3'), r"config.backbone.stages=\('layer2', 'layer3'\) is not allowed: must be stages of efficientnet_lite0"),
    ('calibration__holdout', 1.0, r'config.calibration.holdout=1.0'),
    ('scoring__distance', 'cosine', r"distance \(scoring.distance\) = 'cosine'"),
    ('coreset__method', 'fast', r"coreset_method \(coreset.method\) = 'fast' is not allowed: must be one of \('auto', 'lazy', 'full'\)"),
    ('knn__block_size', '0', r"block_size \(knn.block_size\) = 0 is not allowed: must be a positive integer or 'auto'"),
    ('knn__block_size', 'big', r"block_size \(knn.block_size\) = 'big' is not allowed"),
    ('knn__screen', 'maybe', r"screen \(knn.screen\) = 'maybe' is not allowed: must be True, False or 'auto'"),
    ('coreset__memory_budget_gb', -1.0, r'config.coreset.memory_budget_gb=-1.0 is not allowed'),
    ('coreset__spill_dir', '/nonexistent/spill', r"config.coreset.spill_dir='/nonexistent/spill': not a writable folder"),
])
def test_bad_config_values_fail_before_any_work(tmp_path, field, value, message):
  root = _dataset(tmp_path / 'd')
  start = time.perf_counter()
  with pytest.raises(errors.UserError, match=message):
    experiment.run(_tiny_config(root, **{field: value}), str(tmp_path / 'out'))
  assert time.perf_counter() - start < 10  # No backbone was run.
  assert not os.path.exists(tmp_path / 'out' / 'status.json')  # The workdir was not touched.


def test_search_settings_read_from_the_command_line():
  config = mvtec.get_config()
  assert config_lib.settings_from_config(config).block_size == 'auto'
  for text, block_size, screen in (('512', 512, 'False'), (' 64 ', 64, 'TRUE'),
                                   ('auto', 'auto', 'auto')):
    config.knn.block_size, config.knn.screen = text, screen
    settings = config_lib.settings_from_config(config)
    assert settings.block_size == block_size
    assert settings.screen == {'False': False, 'TRUE': True, 'auto': 'auto'}[screen]


def test_image_size_larger_than_resize_is_refused(tmp_path):
  config = _tiny_config(_dataset(tmp_path / 'd'), data__transform='resize_crop',
                        data__image_size=80)
  with pytest.raises(errors.UserError, match=r'image_size \(data.image_size\) = 80 is larger than '
                                             r'resize \(data.resize\) = 64'):
    experiment.run(config, str(tmp_path / 'out'))


def test_k_larger_than_the_memory_bank_is_known_before_extraction(tmp_path):
  root = _dataset(tmp_path / 'd')  # 6 images x 8 x 8 patches, 1 % -> 3 patches.
  config = _tiny_config(root, coreset__percentage=0.01, knn__k=5)
  with pytest.raises(errors.UserError, match=r'k \(knn.k\) = 5 is larger than the memory bank, '
                                             r'3 patches \(0.01 of 6 images x 8 x 8\)'):
    experiment.run(config, str(tmp_path / 'out'))


def test_stages_follow_an_overridden_backbone():
  config = mvtec.get_config('backbone=efficientnet_lite2')
  assert tuple(config.backbone.stages) == ()  # Not Lite2's names: they follow the backbone.
  config.backbone.name = 'efficientnet_lite0'
  backbone = config_lib.load_backbone(config_lib.backbone_spec(config),
                                     image_size=config.data.image_size)
  assert backbone.stages == backbones.DEFAULT_STAGES['efficientnet_lite0'] == ('blocks.4',
                                                                               'blocks.10')
  assert [backbone.strides[s] for s in backbone.stages] == [8, 16]


def test_missing_checkpoint_message_says_how_to_get_one(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    backbones.load_backbone('wide_resnet50_2', cache_dir=str(tmp_path))
  assert 'python -m patchcore_jax.backbones.fetch wide_resnet50_2' in str(info.value)
  assert 'https://' in str(info.value) and 'downloads  into' not in str(info.value)
  with pytest.raises(FileNotFoundError) as info:
    backbones.load_backbone('efficientnet_lite0', checkpoint=str(tmp_path / 'gone.pth'))
  assert 'no such file' in str(info.value) and 'downloads' not in str(info.value)


# -------------------------------------------------------------------------------- Workdirs.


def test_workdir_of_another_run_is_refused_or_replaced(tmp_path):
  root = _dataset(tmp_path / 'd')
  out = str(tmp_path / 'out')
  experiment.run(_tiny_config(root), out)
  status = json.load(open(os.path.join(out, 'status.json')))
  assert status['status'] == 'complete' and status['done'] == ['d']
  assert json.load(open(os.path.join(out, 'results.json')))['d']['status'] == 'complete'
  with pytest.raises(errors.UserError, match=r'already holds another run.*status \'complete\''):
    experiment.run(_tiny_config(root), out)
  # A rerun on other data with overwrite leaves nothing of the first run.
  other = _dataset(tmp_path / 'other')
  experiment.run(_tiny_config(other, output__overwrite=True), out)
  assert os.listdir(os.path.join(out, 'scores')) == ['other.csv']
  assert os.listdir(os.path.join(out, 'maps')) == ['other']
  assert list(json.load(open(os.path.join(out, 'results.json')))) == ['other']


def test_failed_run_is_marked_failed(tmp_path, monkeypatch):
  root = _dataset(tmp_path / 'd')

  def broken(*args, **kwargs):
    raise RuntimeError('disk on fire')

  monkeypatch.setattr(experiment, 'run_category', broken)
  with pytest.raises(RuntimeError):
    experiment.run(_tiny_config(root), str(tmp_path / 'out'))
  status = json.load(open(tmp_path / 'out' / 'status.json'))
  assert status['status'] == 'failed' and 'disk on fire' in status['error']
  assert not os.path.exists(tmp_path / 'out' / 'results.json')


def test_killed_run_cannot_pass_for_a_finished_one(tmp_path):
  out = tmp_path / 'out'
  proc = subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config=configs/demo.py:backbone=efficientnet_lite0',
       f'--workdir={out}', '--config.data.max_train_images=8', '--config.data.image_size=64',
       '--config.output.num_overlays=0'], cwd=ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.DEVNULL)
  deadline = time.time() + 300
  while time.time() < deadline:  # Kill as soon as the first of two categories is done.
    status = None
    if os.path.exists(out / 'status.json'):
      status = json.load(open(out / 'status.json'))
    if status and status['done']:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  status = json.load(open(out / 'status.json'))
  assert status['status'] == 'running' and status['done'] == ['weave']
  results = json.load(open(out / 'results.json'))
  assert list(results) == ['weave']  # The second category never appears as if finished.
  assert not os.path.exists(out / 'results.md')
  assert not [n for n in os.listdir(out) if '.tmp' in n]


def test_sigint_leaves_an_experiment_interrupted_with_exit_130(tmp_path):
  out = tmp_path / 'out'
  # SIGINT handled as from a terminal, even where the test runner's process ignores it.
  start = ('import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); '
           'sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")')
  proc = subprocess.Popen(
      [sys.executable, '-c', start, os.path.join(ROOT, 'launch.py'),
       '--config=configs/demo.py:backbone=efficientnet_lite0', f'--workdir={out}',
       '--config.data.max_train_images=8', '--config.data.image_size=64',
       '--config.output.num_overlays=0'], cwd=ROOT, stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 300
  while time.time() < deadline and not os.path.exists(out / 'status.json'):
    time.sleep(0.05)
  proc.send_signal(signal.SIGINT)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 130, stderr[-3000:]
  assert stderr.strip().splitlines()[-1] == 'interrupted by SIGINT'
  status = json.load(open(out / 'status.json'))
  assert status['status'] == 'interrupted' and status['signal'] == 'SIGINT'
  assert not [n for n in os.listdir(out) if '.tmp' in n]


# ---------------------------------------------------------------------- Through launch.py.


@pytest.mark.parametrize('args, message', [
    (['--config=configs/mvtec.py:backbone=resnet_foo', '--config.data.root={data}'],
     "error: config.backbone.name='resnet_foo' is not allowed"),
    (['--config=configs/folder.py', '--config.data.root={data}', '--config.coreset.percentage=1.5'],
     'error: percentage (coreset.percentage) = 1.5 is not allowed'),
    (['--config=configs/folder.py', '--config.data.root={missing}'],
     "error: config.data.root='{missing}': no such folder"),
    (['--config=configs/folder.py', '--config.data.root={data}', '--config.knn.k=0'],
     'error: k (knn.k) = 0 is not allowed'),
    (['--config=configs/folder.py', '--config.coreset.percentag=0.1'],
     'error: bad command line or config (AttributeError): \'percentag\' Did you mean "percentage"'),
    (['--config=configs/mvtec.py:categroy=bottle'],
     "error: bad command line or config (IllegalFlagValueError): flag --config=configs/mvtec.py:"
     "categroy=bottle: Error whilst parsing config file: ValueError: bad config argument"),
    (['--config=configs/nonexistent.py'], 'error: cannot load the config (OSError)'),
])
def test_user_errors_end_without_a_traceback(tmp_path, args, message):
  root = _dataset(tmp_path / 'd')
  fill = lambda s: s.format(data=root, missing=tmp_path / 'missing')
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *map(fill, args),
                         f'--workdir={tmp_path / "out"}'], cwd=ROOT, capture_output=True,
                        text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith(fill(message)), proc.stderr[-2000:]


# ----------------------------------------------------------------------------- Determinism.


def test_same_seed_gives_byte_identical_outputs(tmp_path):
  root = _dataset(tmp_path / 'd')
  for name in ('a', 'b'):
    experiment.run(_tiny_config(root), str(tmp_path / name))
  for sub in ('scores/d.csv', *[f'maps/d/{n}' for n in os.listdir(tmp_path / 'a' / 'maps' / 'd')]):
    assert open(tmp_path / 'a' / sub, 'rb').read() == open(tmp_path / 'b' / sub, 'rb').read(), sub
  with open(tmp_path / 'a' / 'scores' / 'd.csv') as f:
    assert len(list(csv.DictReader(f))) == 6
