"""The predict job: a saved model scores new images from a folder, glob or list file."""
import csv
import os
import shutil
import subprocess
import sys

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
