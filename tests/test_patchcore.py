"""The fitted model: fit, predict, calibration, save/load, export, and compiling once."""
import dataclasses
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from patchcore_jax import backbones
from patchcore_jax import data
from patchcore_jax import deploy
from patchcore_jax import errors
from patchcore_jax import memory_bank
from patchcore_jax import metrics
from patchcore_jax import model as model_lib
from patchcore_jax import patchcore
from patchcore_jax import saving
from patchcore_jax import stages
from patchcore_jax.data import transforms

# One worker runs this file's tests, so the module fixtures are fitted once.
pytestmark = pytest.mark.xdist_group('fitted_model')

SETTINGS = model_lib.Settings(image_size=128, resize=128, transform='resize', pretrain_dim=256,
                              target_dim=128, batch_size=4)


@pytest.fixture(scope='module')
def tiles(tmp_path_factory):
  """(train paths, test paths, test labels) of a small slice of the synthetic 'tiles'."""
  root = data.make_synthetic_dataset(str(tmp_path_factory.mktemp('data')), 'tiles')
  split = data.folder_split(root)
  test = split.test[::3]
  return [s.path for s in split.train[:20]], [s.path for s in test], np.array([s.label for s in test])


@pytest.fixture(scope='module')
def backbone():
  return backbones.load_backbone('efficientnet_lite0')  # Real ImageNet weights, small.


@pytest.fixture(scope='module')
def model(backbone, tiles):
  return patchcore.fit(backbone, tiles[0], SETTINGS, holdout=0.2, target_fpr=0.25, progress=False)


def test_fit_holds_out_images_and_calibrates_a_threshold(model, backbone, tiles):
  info = dict(model.info)
  assert info['num_train_images'] == 16 and info['num_holdout_images'] == 4
  assert model.memory_bank_size == int(16 * 16 * 16 * 0.1)
  cal = model.calibration
  assert cal.image_threshold_source == 'holdout' and len(cal.holdout_scores) == 4
  # m = floor(0.25 * 4) = 1: the second largest held-out score; one of four lies above it.
  assert cal.image_threshold == sorted(cal.holdout_scores)[-2]
  # The held-out images are exactly those left out of the bank: refit on the 16 others alone.
  train_idx, held_idx = model_lib.split_holdout(20, holdout=0.2, seed=0)
  again = patchcore.fit(backbone, [tiles[0][i] for i in train_idx], SETTINGS, progress=False)
  held = patchcore.predict(again, [tiles[0][i] for i in held_idx])
  np.testing.assert_array_equal(np.sort(held.image_scores), np.array(cal.holdout_scores,
                                                                      np.float32))
  assert again.calibration.image_threshold is None


def test_predict_scores_normalises_and_decides(model, tiles):
  pred = patchcore.predict(model, tiles[1])
  n = len(tiles[1])
  assert pred.image_scores.shape == (n,) and pred.maps.shape == (n, 128, 128)
  assert pred.patch_scores.shape == (n, 16, 16)
  thr = model.calibration.image_threshold
  np.testing.assert_allclose(pred.normalized_scores, pred.image_scores / (2 * thr), rtol=1e-6)
  np.testing.assert_array_equal(pred.anomalous, pred.image_scores > thr)
  np.testing.assert_allclose(pred.image_scores, pred.patch_scores.max(axis=(1, 2)), rtol=1e-6)
  assert metrics.image_auroc(tiles[2], pred.image_scores) >= 0.95
  assert np.mean(pred.anomalous == tiles[2]) >= 0.85


def test_arrays_and_files_give_the_same_scores(model, tiles):
  paths = tiles[1][:5]
  uint8 = np.stack([np.asarray(transforms.Image.open(p).convert('RGB')) for p in paths])
  floats = np.stack([transforms.load_image(p, **model.settings.image_config) for p in paths])
  by_path = patchcore.predict(model, paths).image_scores
  np.testing.assert_array_equal(patchcore.predict(model, uint8).image_scores, by_path)
  np.testing.assert_array_equal(patchcore.predict(model, floats).image_scores, by_path)
  with pytest.raises(ValueError, match='128 x 128'):
    patchcore.predict(model, floats[:, :64, :64])


def test_accelerator_input_pipeline_forced_on_the_cpu_gives_the_same_model(
    model, backbone, tiles, monkeypatch):
  """The accelerators' pipeline (images copied to the device two batches ahead, decoding read
  ahead) forced on the CPU: the same bank and the same scores, bit for bit."""
  from patchcore_jax.data import common  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(common, 'default_device_prefetch', lambda: 2)
  monkeypatch.setattr(common, 'default_prefetch', lambda: 2)
  ahead = patchcore.fit(backbone, tiles[0], SETTINGS, holdout=0.2, target_fpr=0.25,
                        progress=False)
  np.testing.assert_array_equal(np.asarray(ahead.bank.blocks), np.asarray(model.bank.blocks))
  np.testing.assert_array_equal(patchcore.predict(ahead, tiles[1]).image_scores,
                                patchcore.predict(model, tiles[1]).image_scores)


def test_fit_rejects_bad_settings(backbone, tiles):
  with pytest.raises(TypeError, match='precentage'):
    patchcore.fit(backbone, tiles[0], precentage=0.1)  # pylint: disable=unexpected-keyword-arg
  with pytest.raises(TypeError, match='Settings'):
    patchcore.fit(backbone, tiles[0], {'percentage': 0.1})
  with pytest.raises(errors.UserError, match=r'^percentage = 1.5 is not allowed'):
    patchcore.fit(backbone, tiles[0], model_lib.Settings(percentage=1.5))
  with pytest.raises(errors.UserError, match='holdout=1.0'):
    patchcore.fit(backbone, tiles[0], holdout=1.0)


def test_backbone_compiles_once_for_fit_and_predict(backbone, tiles):
  """Fit, holdout scoring and prediction share one compiled embedding per shape."""
  settings = dataclasses.replace(SETTINGS, target_dim=96)  # Shapes no other test compiles.
  cache = stages.StageCache()
  model = patchcore.fit(backbone, tiles[0][:8], settings, holdout=0.25, progress=False,
                        cache=cache)
  patchcore.predict(model, tiles[1][:6], cache=cache)
  patchcore.predict(model, tiles[1][6:9], cache=cache)
  assert sorted(k[0].__name__ for k in cache.keys()) == ['embed', 'score']
  assert cache.compile_seconds > 0  # Its own cache: the process-wide one did not compile these.
  assert not set(cache.keys()) & set(stages.DEFAULT_CACHE.keys())


def test_save_load_round_trip_is_bit_identical(model, tiles, tmp_path):
  directory = saving.save(model, str(tmp_path / 'm'))
  record = json.load(open(os.path.join(directory, 'model.json')))
  assert record['format_version'] == saving.FORMAT_VERSION
  assert record['backbone']['weights_sha256'] == model.backbone.weights_sha256
  assert record['settings']['image_size'] == 128 and record['memory_bank_size'] == model.bank.size
  loaded = saving.load(directory)
  assert loaded.settings == model.settings and loaded.calibration == model.calibration
  np.testing.assert_array_equal(memory_bank.bank_rows(loaded.bank),
                                memory_bank.bank_rows(model.bank))
  a, b = patchcore.predict(model, tiles[1]), patchcore.predict(loaded, tiles[1])
  np.testing.assert_array_equal(a.image_scores, b.image_scores)
  np.testing.assert_array_equal(a.maps, b.maps)


def _broken_copy(directory, tmp_path, name):
  import shutil  # pylint: disable=g-import-not-at-top
  target = str(tmp_path / name)
  shutil.copytree(directory, target)
  return target


def test_load_refuses_broken_models_naming_the_file(model, tmp_path):
  directory = saving.save(model, str(tmp_path / 'm'))
  with pytest.raises(errors.UserError, match='no model directory'):
    saving.load(str(tmp_path / 'nothing'))
  missing = _broken_copy(directory, tmp_path, 'missing')
  os.remove(os.path.join(missing, 'bank.npz'))
  with pytest.raises(errors.UserError, match=r'missing.*bank\.npz is missing'):
    saving.load(missing)
  truncated = _broken_copy(directory, tmp_path, 'truncated')
  path = os.path.join(truncated, 'bank.npz')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(errors.UserError, match=r'truncated.*bank\.npz does not match the checksum'):
    saving.load(truncated)
  newer = _broken_copy(directory, tmp_path, 'newer')
  record = json.load(open(os.path.join(newer, 'model.json')))
  record['format_version'] = saving.FORMAT_VERSION + 1
  json.dump(record, open(os.path.join(newer, 'model.json'), 'w'))
  with pytest.raises(errors.UserError, match=r'newer.*model\.json has format version 2'):
    saving.load(newer)
  other = _broken_copy(directory, tmp_path, 'other_weights')
  record = json.load(open(os.path.join(other, 'model.json')))
  record['backbone']['random_seed'] = 1  # Loads other weights than were fitted with.
  json.dump(record, open(os.path.join(other, 'model.json'), 'w'))
  with pytest.raises(errors.UserError, match=r'other_weights.*model\.json was fitted with efficientnet_lite0'):
    saving.load(other)
  garbage = _broken_copy(directory, tmp_path, 'garbage')
  with open(os.path.join(garbage, 'model.json'), 'w') as f:
    f.write('{not json')
  with pytest.raises(errors.UserError, match=r'cannot read .*garbage.*model\.json'):
    saving.load(garbage)


def test_save_can_embed_the_backbone(model, tiles, tmp_path):
  with pytest.raises(ValueError, match='weights as loaded'):  # Folded: not the loaded weights.
    saving.save(model, str(tmp_path / 'folded'), include_backbone=True)
  as_loaded = backbones.load_backbone('efficientnet_lite0', fold=False)
  directory = saving.save(model, str(tmp_path / 'm'), include_backbone=True, backbone=as_loaded)
  record = json.load(open(os.path.join(directory, 'model.json')))
  record['backbone']['checkpoint'] = str(tmp_path / 'gone.pth')  # Only the embedded file serves.
  json.dump(record, open(os.path.join(directory, 'model.json'), 'w'))
  loaded = saving.load(directory)
  np.testing.assert_array_equal(patchcore.predict(loaded, tiles[1][:4]).image_scores,
                                patchcore.predict(model, tiles[1][:4]).image_scores)


def test_export_runs_without_this_package(model, tiles, tmp_path):
  """The exported program and its loader need jax and numpy only; scores match predict."""
  directory = deploy.export(model, str(tmp_path / 'exported'), batch_size=4)
  paths = tiles[1][:6]
  images = np.stack([(transforms.load_image(p, **model.settings.image_config) * 255).round()
                     .astype(np.uint8) for p in paths])
  np.save(tmp_path / 'images.npy', images)
  script = (
      'import sys\n'
      'sys.modules["patchcore_jax"] = None  # Importing it now fails.\n'
      f'sys.path.insert(0, {directory!r})\n'
      'import numpy as np, patchcore_exported\n'
      f'model = patchcore_exported.load({directory!r})\n'
      f'out = model(np.load({str(tmp_path / "images.npy")!r}))\n'
      f'np.savez({str(tmp_path / "out.npz")!r}, scores=out["scores"], maps=out["maps"],\n'
      '         anomalous=out["anomalous"])\n')
  proc = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'PYTHONPATH': ''})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = np.load(tmp_path / 'out.npz')
  expected = patchcore.predict(model, images)
  np.testing.assert_allclose(out['scores'], expected.image_scores, rtol=1e-5)
  np.testing.assert_allclose(out['maps'], expected.maps, rtol=1e-5, atol=1e-5 * expected.maps.max())
  np.testing.assert_array_equal(out['anomalous'], expected.anomalous)


def test_disk_bank_reads_what_was_written(tmp_path):
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(1000, 24)).astype(np.float32)
  bank = memory_bank.DiskBank(1000, 24, directory=str(tmp_path))
  assert os.listdir(tmp_path) == []  # Unlinked at once: nothing is left behind.
  for start in range(0, 1000, 300):
    bank.write(start, rows[start:start + 300])
  np.testing.assert_array_equal(bank[:], rows)
  np.testing.assert_array_equal(bank[123:457], rows[123:457])
  idx = np.array([999, 3, 4, 5, 500, 4, 0, 998])  # Runs, repeats, any order.
  np.testing.assert_array_equal(bank.take(idx), rows[idx])
  with pytest.raises(IndexError):
    bank[::2]  # pylint: disable=pointless-statement
  bank.close()


def test_streamed_bank_gives_the_same_model(backbone, tiles):
  # Over the memory budget, the bank goes to a file and is read back for the projection and the
  # selected rows: the same coreset, bank and scores as in memory.
  fit = lambda **kw: patchcore.fit(backbone, tiles[0][:8], SETTINGS, progress=False, **kw)
  in_memory = fit()
  streamed = fit(memory_budget_bytes=0)
  assert dict(in_memory.info)['memory_bank_storage'] == 'memory'
  assert dict(streamed.info)['memory_bank_storage'] == 'disk'
  np.testing.assert_array_equal(np.asarray(in_memory.bank.blocks), np.asarray(streamed.bank.blocks))
  a = patchcore.predict(in_memory, tiles[1][:4], progress=False).image_scores
  b = patchcore.predict(streamed, tiles[1][:4], progress=False).image_scores
  np.testing.assert_array_equal(a, b)
