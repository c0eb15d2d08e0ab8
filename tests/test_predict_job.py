"""The predict job: a saved model scores new images from a folder, glob or list file."""
import csv
import errno
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
from PIL import Image
import pytest

from configs import demo
from configs import predict as predict_config
from patchcore_jax import errors
from patchcore_jax.jobs import experiment
from patchcore_jax.jobs import predict as predict_job

# One worker runs this file's tests, so the module fixtures are fitted once.
pytestmark = pytest.mark.xdist_group('predict_job')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def fitted(tmp_path_factory):
  """(workdir of a small demo run with its saved model, the generated data's test folder)."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = demo.get_config('category=tiles')
  config.data.max_train_images = 20
  config.data.image_size = 128
  config.data.batch_size = 4
  config.output.num_overlays = 0
  experiment.run(config, workdir)
  return workdir, os.path.join(workdir, 'data', 'tiles', 'test')


def _config(model, images, **overrides):
  config = predict_config.get_config()
  config.model, config.images = model, images
  for key, value in overrides.items():
    config.output[key] = value
  return config


def _rows(workdir):
  with open(os.path.join(workdir, 'predictions.csv')) as f:
    return list(csv.DictReader(f))


def test_scores_equal_the_experiment_run_bit_for_bit(fitted, tmp_path):
  workdir, test_dir = fitted
  summary = predict_job.run(_config(os.path.join(workdir, 'models', 'tiles'), test_dir,
                                    overlays=False, masks=False), str(tmp_path))
  assert summary['exit_status'] == 0 and summary['num_scored'] == 51
  with open(os.path.join(workdir, 'scores', 'tiles.csv')) as f:
    expected = {r['path'].split('tiles/test/')[1]: r['score'] for r in csv.DictReader(f)}
  rows = _rows(str(tmp_path))
  assert [r['path'] for r in rows] == sorted(expected)  # Relative to the folder, sorted.
  assert all(r['score'] == expected[r['path']] for r in rows)
  assert not os.path.exists(tmp_path / 'overlays') and not os.path.exists(tmp_path / 'masks')


def test_launcher_writes_rows_masks_and_overlays_and_survives_bad_files(fitted, tmp_path):
  workdir, test_dir = fitted
  images = tmp_path / 'incoming'
  os.makedirs(images / 'line2')
  for name in ('000.png', '001.png'):
    shutil.copy(os.path.join(test_dir, 'crack', name), images / name)
  # A non-square image of another size: its mask comes back at 300 x 200.
  Image.open(os.path.join(test_dir, 'good', '000.png')).resize((300, 200)).save(
      images / 'line2' / 'wide.png')
  (images / 'line2' / 'broken.png').write_bytes(b'not a png at all')
  out = tmp_path / 'out'
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config=configs/predict.py',
       f'--config.model={os.path.join(workdir, "models", "tiles")}', f'--config.images={images}',
       f'--workdir={out}'], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 1, proc.stderr[-3000:]  # One image could not be read.
  rows = {r['path']: r for r in _rows(str(out))}
  assert sorted(rows) == ['000.png', '001.png', 'line2/broken.png', 'line2/wide.png']
  assert rows['line2/broken.png']['score'] == '' and 'UnidentifiedImageError' in rows[
      'line2/broken.png']['error']
  for name in ('000.png', '001.png', 'line2/wide.png'):
    row = rows[name]
    assert row['error'] == '' and float(row['score']) > 0
    assert float(row['normalized_score']) == pytest.approx(
        float(row['score']) / (2 * _threshold(workdir)), rel=1e-6)
    assert row['anomalous'] == str(int(float(row['score']) > _threshold(workdir)))
  assert rows['000.png']['anomalous'] == '1'  # A cracked tile.
  mask = np.asarray(Image.open(out / 'masks' / 'line2' / 'wide.png'))
  assert mask.shape == (200, 300) and set(np.unique(mask)) <= {0, 255}
  assert np.asarray(Image.open(out / 'masks' / '000.png')).any()  # The crack is marked.
  assert Image.open(out / 'overlays' / '000.png').size[0] == 3 * 128
  assert not os.path.exists(out / 'predictions.csv.tmp')


def _threshold(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'models', 'tiles', 'model.json')) as f:
    return json.load(f)['calibration']['image_threshold']


def test_glob_and_list_file_inputs(fitted, tmp_path):
  workdir, test_dir = fitted
  model = os.path.join(workdir, 'models', 'tiles')
  summary = predict_job.run(_config(model, os.path.join(test_dir, 'c*', '00[0-2].png'),
                                    overlays=False, masks=False), str(tmp_path / 'glob'))
  # Relative to the matches' common folder.
  assert [r['path'] for r in _rows(str(tmp_path / 'glob'))] == [
      f'{d}/00{i}.png' for d in ('chip', 'crack') for i in range(3)]
  assert summary['num_scored'] == 6
  # The same workdir again: refused, unless the previous outputs may be replaced.
  with pytest.raises(errors.UserError, match='already holds another run'):
    predict_job.run(_config(model, os.path.join(test_dir, 'chip', '000.png')),
                    str(tmp_path / 'glob'))
  config = _config(model, os.path.join(test_dir, 'chip', '000.png'), overlays=False, masks=False,
                   save_maps=True)
  config.output.overwrite = True
  predict_job.run(config, str(tmp_path / 'glob'))
  assert [r['path'] for r in _rows(str(tmp_path / 'glob'))] == ['000.png']
  assert os.listdir(tmp_path / 'glob' / 'maps') == ['000.npy']  # Nothing left of the first run.
  assert np.load(tmp_path / 'glob' / 'maps' / '000.npy').shape == (128, 128)
  listing = tmp_path / 'list.txt'
  listing.write_text('# one path per line\n' + os.path.join(test_dir, 'good', '003.png') +
                     '\n\n' + os.path.join(test_dir, 'chip', '004.png') + '\n')
  predict_job.run(_config(model, str(listing), overlays=False, masks=False),
                  str(tmp_path / 'list'))
  assert [r['path'] for r in _rows(str(tmp_path / 'list'))] == ['good/003.png', 'chip/004.png']


def test_user_errors_name_the_problem(fitted, tmp_path):
  workdir, _ = fitted
  with pytest.raises(errors.UserError, match='config.model is empty'):
    predict_job.run(_config('', 'x'), str(tmp_path))
  with pytest.raises(errors.UserError, match='no such folder'):
    predict_job.run(_config(os.path.join(workdir, 'models', 'tiles'), str(tmp_path / 'nope')),
                    str(tmp_path))
  proc = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config=configs/predict.py',
       f'--config.model={tmp_path / "no_model"}', f'--config.images={tmp_path}',
       f'--workdir={tmp_path / "out"}'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2
  assert 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == f'error: no model directory at {tmp_path / "no_model"}'


# ------------------------------------------------- Overnight runs: names, pixels, signals, disks.


def _read(workdir):
  """predictions.csv rows as written: paths with their bytes (surrogate escapes)."""
  with open(os.path.join(workdir, 'predictions.csv'), encoding='utf-8', errors='surrogateescape',
            newline='') as f:
    return list(csv.DictReader(f))


def _status(workdir):
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(workdir, 'status.json')) as f:
    return json.load(f)


def test_any_file_name_round_trips_and_no_image_stops_the_run(fitted, tmp_path):
  workdir, test_dir = fitted
  images = tmp_path / 'night'
  os.makedirs(images)
  latin1 = os.fsdecode(b'caf\xe9.png')  # Not UTF-8: a share written by another system.
  odd = [latin1, 'a,"b".png', 'new\nline.png', 'x' * 240 + '.png']
  for name in odd:
    shutil.copy(os.path.join(test_dir, 'crack', '000.png'), os.path.join(str(images), name))
  out = str(tmp_path / 'out')
  summary = predict_job.run(_config(os.path.join(workdir, 'models', 'tiles'), str(images)), out)
  rows = {r['path']: r for r in _read(out)}
  assert sorted(rows) == sorted(odd)  # The exact names, bytes included.
  assert all(r['score'] and float(r['score']) > 0 for r in rows.values())
  scores = {r['score'] for r in rows.values()}
  assert len(scores) == 1  # The same picture under four names.
  # The 244-byte name fits the file system, its overlay's temporary name does not: that image's
  # row says so, and the others are complete.
  assert 'outputs not written' in rows['x' * 240 + '.png']['error']
  assert 'File name too long' in rows['x' * 240 + '.png']['error']
  for name in odd[:3]:
    assert rows[name]['error'] == ''
    stem = os.path.splitext(name)[0]
    assert os.path.isfile(os.path.join(out, 'masks', stem + '.png'))
    assert os.path.isfile(os.path.join(out, 'overlays', stem + '.png'))
  assert b'caf\xe9.png' in os.listdir(os.fsencode(os.path.join(out, 'masks')))
  assert summary['num_scored'] == 4 and summary['num_failed'] == 1
  assert summary['exit_status'] == 1
  # A list file naming it by its bytes.
  listing = tmp_path / 'list.txt'
  listing.write_bytes(os.fsencode(os.path.join(str(images), latin1)) + b'\n')
  predict_job.run(_config(os.path.join(workdir, 'models', 'tiles'), str(listing), overlays=False,
                          masks=False), str(tmp_path / 'listed'))
  assert [r['path'] for r in _read(str(tmp_path / 'listed'))] == [latin1]


def test_nan_and_inf_pixels_are_refused_by_name(fitted, tmp_path):
  workdir, test_dir = fitted
  images = tmp_path / 'floats'
  os.makedirs(images)
  for name, bad in (('nan.tiff', np.nan), ('inf.tiff', -np.inf), ('ok.tiff', 0.25)):
    values = np.full((64, 96), 0.5, np.float32)
    values[3, 4:6] = bad
    Image.fromarray(values, 'F').save(images / name)
  shutil.copy(os.path.join(test_dir, 'good', '000.png'), images / 'good.png')
  summary = predict_job.run(_config(os.path.join(workdir, 'models', 'tiles'), str(images),
                                    overlays=False, masks=False), str(tmp_path / 'out'))
  rows = {r['path']: r for r in _read(str(tmp_path / 'out'))}
  assert rows['nan.tiff']['score'] == '' and 'NonFiniteImage' in rows['nan.tiff']['error']
  assert 'nan.tiff: 2 of 6144 pixels are not finite (2 NaN, 0 infinite)' in rows['nan.tiff'][
      'error']
  assert rows['inf.tiff']['score'] == '' and '(0 NaN, 2 infinite)' in rows['inf.tiff']['error']
  assert rows['ok.tiff']['error'] == '' and rows['good.png']['error'] == ''
  assert summary['num_failed'] == 2 and summary['exit_status'] == 1


def _launch_predict(model, images, out, *extra):
  return subprocess.Popen(
      [sys.executable, os.path.join(ROOT, 'launch.py'), '--config=configs/predict.py',
       f'--config.model={model}', f'--config.images={images}', f'--workdir={out}', *extra],
      cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_sigterm_keeps_whole_batches_and_resume_gives_the_uninterrupted_csv(fitted, tmp_path):
  workdir, test_dir = fitted
  model = os.path.join(workdir, 'models', 'tiles')
  listing = tmp_path / 'list.txt'  # 153 entries: every test image three times.
  tests = sorted(os.path.join(d, n) for d, _, names in os.walk(test_dir) for n in names)
  listing.write_text(''.join(p + '\n' for p in tests * 3))
  out = tmp_path / 'out'
  proc = _launch_predict(model, listing, out, '--config.output.overlays=False')
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:  # SIGTERM once the first rows are in.
    if os.path.exists(out / 'predictions.csv') and len(_read(str(out))) >= 4:
      break
    time.sleep(0.01)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 143, stderr[-3000:]
  rows = _read(str(out))
  status = _status(str(out))
  assert status['status'] == 'interrupted' and status['signal'] == 'SIGTERM'
  assert status['images_done'] == len(rows) and 0 < len(rows) < 153
  assert len(rows) % 4 == 0  # Whole batches only.
  assert stderr.strip().splitlines()[-1] == (
      f'interrupted by SIGTERM: {len(rows)} of 153 images are in {out}/predictions.csv; '
      'continue with --config.resume=True')
  # Without resume the workdir is refused, saying how to continue; with other inputs as well.
  config = _config(model, str(listing), overlays=False)
  with pytest.raises(errors.UserError, match='pass --config.resume=True'):
    predict_job.run(config, str(out))
  config.resume = True
  config.threshold = 1.0
  with pytest.raises(errors.UserError, match=r'used other inputs.*threshold: was -1.0, now 1.0'):
    predict_job.run(config, str(out))
  config.threshold = -1.0
  with open(out / 'predictions.csv', 'a', newline='') as f:  # A row a SIGKILL cut short.
    f.write('chip/000.png,123')
  summary = predict_job.run(config, str(out))
  assert summary['num_resumed'] == len(rows) and summary['num_this_run'] == 153 - len(rows)
  assert summary['status'] == 'complete' and _status(str(out))['status'] == 'complete'
  assert _status(str(out))['resumed']['signal'] == 'SIGTERM'
  config.resume = False
  predict_job.run(config, str(tmp_path / 'whole'))
  with open(out / 'predictions.csv', 'rb') as f, open(tmp_path / 'whole' / 'predictions.csv',
                                                       'rb') as g:
    assert f.read() == g.read()  # Row for row, score for score.
  assert sorted(os.listdir(out / 'masks')) == sorted(os.listdir(tmp_path / 'whole' / 'masks'))


def test_a_full_disk_ends_with_one_error_naming_the_file(fitted, tmp_path, monkeypatch):
  workdir, test_dir = fitted
  model = os.path.join(workdir, 'models', 'tiles')
  calls = []
  real_fsync = os.fsync

  def fsync(fd):  # The third flush of predictions.csv finds the disk full.
    calls.append(fd)
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_fsync(fd)

  monkeypatch.setattr(os, 'fsync', fsync)
  out = str(tmp_path / 'out')
  with pytest.raises(errors.UserError) as info:
    predict_job.run(_config(model, test_dir, overlays=False, masks=False), out)
  assert str(info.value) == (f'cannot write {out}/predictions.csv: No space left on device (the '
                             'disk is full)')
  status = _status(out)
  assert status['status'] == 'failed' and 'No space left on device' in status['error']
  monkeypatch.undo()
  # The outputs of one image: a read-only file system stops the run as well.
  real_save = predict_job.files.save_png

  def save_png(path, array):
    if 'crack' in path:
      raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    return real_save(path, array)

  monkeypatch.setattr(predict_job.files, 'save_png', save_png)
  out = str(tmp_path / 'readonly')
  with pytest.raises(errors.UserError, match=r'cannot write .*/overlays/crack/000\.png: '
                     r'Read-only file system \(the file system is read-only\)'):
    predict_job.run(_config(model, test_dir), out)
  assert _status(out)['status'] == 'failed'
  assert [r['path'] for r in _read(out)] == [f'chip/{i:03d}.png' for i in range(12)]


def test_a_vanished_workdir_is_named_not_recreated(fitted, tmp_path, monkeypatch):
  workdir, test_dir = fitted
  out = str(tmp_path / 'out')
  real = predict_job.patchcore.predict_batch
  calls = []

  def predict_batch(model, batch):
    calls.append(1)
    if len(calls) == 2:
      shutil.rmtree(out)
    return real(model, batch)

  monkeypatch.setattr(predict_job.patchcore, 'predict_batch', predict_batch)
  with pytest.raises(errors.UserError, match=r'cannot write .*/out/predictions.csv: it was '
                     'removed or replaced while the job ran'):
    predict_job.run(_config(os.path.join(workdir, 'models', 'tiles'), test_dir), out)
  assert not os.path.exists(out)


@pytest.fixture
def tiny_tmpfs(tmp_path):
  """A 512 KiB tmpfs mounted for the test (skips where mounting is not allowed)."""
  mountpoint = tmp_path / 'tmpfs'
  os.makedirs(mountpoint)
  proc = subprocess.run(['mount', '-t', 'tmpfs', '-o', 'size=512k', 'tmpfs', str(mountpoint)],
                        capture_output=True, text=True, check=False)
  if proc.returncode != 0:
    pytest.skip(f'cannot mount a tmpfs here: {proc.stderr.strip()}')
  try:
    yield mountpoint
  finally:
    subprocess.run(['umount', '-l', str(mountpoint)], check=False)


def test_a_really_full_disk(fitted, tiny_tmpfs):
  workdir, test_dir = fitted
  out = tiny_tmpfs / 'out'
  proc = _launch_predict(os.path.join(workdir, 'models', 'tiles'), test_dir, out,
                         '--config.output.save_maps=True')
  _, stderr = proc.communicate(timeout=300)
  assert proc.returncode == 2, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert last.startswith(f'error: cannot write {out}/') and last.endswith(
      'No space left on device (the disk is full)'), last
  assert 'Traceback' not in stderr
  assert _status(str(out))['status'] == 'failed'
  assert not [n for d, _, names in os.walk(out) for n in names if '.tmp-' in n]
