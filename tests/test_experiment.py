"""End to end: the launcher, configs and the workdir contract."""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(*args, timeout=900):
  return subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=ROOT,
                        capture_output=True, text=True, timeout=timeout)


def test_launcher_runs_the_demo_end_to_end(tmp_path):
  workdir = str(tmp_path / 'demo')
  proc = _launch('--config=configs/demo.py:category=weave', f'--workdir={workdir}',
                 '--config.data.max_train_images=24', '--config.data.image_size=160',
                 '--config.data.batch_size=4', '--config.output.num_overlays=3')
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = json.load(open(os.path.join(workdir, 'results.json')))
  r = results['weave']
  assert set(r) >= {'image_auroc', 'pixel_auroc', 'au_pro', 'memory_bank_size', 'fit_seconds',
                    'inference_seconds_per_image'}
  for metric in ('image_auroc', 'pixel_auroc', 'au_pro'):
    assert 0.85 <= r[metric] <= 1.0, (metric, r[metric])
  # 24 images x 20 x 20 patches at 160 px (stride 8), 10 % kept.
  assert r['memory_bank_size'] == int(24 * 20 * 20 * 0.1)
  with open(os.path.join(workdir, 'scores', 'weave.csv')) as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == 51 and rows[0]['path'].startswith('weave/test/')
  assert {int(r['label']) for r in rows} == {0, 1}
  assert len(os.listdir(os.path.join(workdir, 'maps', 'weave'))) == 3
  config = json.load(open(os.path.join(workdir, 'config.json')))
  assert config['data']['image_size'] == 160
  assert 'image AUROC' in proc.stderr  # The human-readable table is logged.


def test_unknown_config_keys_fail_loudly(tmp_path):
  proc = _launch('--config=configs/demo.py', f'--workdir={tmp_path}',
                 '--config.coreset.percentag=0.1', timeout=120)
  assert proc.returncode != 0 and 'percentag' in proc.stderr
  proc = _launch('--config=configs/mvtec.py:categroy=bottle', f'--workdir={tmp_path}', timeout=120)
  assert proc.returncode != 0 and 'categroy' in proc.stderr


def test_configs_build_and_lock():
  from configs import demo, folder, mtd, mvtec  # pylint: disable=g-import-not-at-top
  c = mvtec.get_config('category=bottle,backbone=vgg16,percentage=0.01')
  assert c.data.categories == ('bottle',) and c.backbone.name == 'vgg16'
  assert c.backbone.stages == ()  # The backbone's own (stride 8, 16) stages.
  assert c.coreset.percentage == 0.01
  assert mvtec.get_config('category=all').data.categories == ('all',)  # Resolved at run time.
  assert mtd.get_config().data.transform == 'resize'
  assert folder.get_config().data.name == 'folder'
  assert demo.get_config('category=tiles').data.categories == ('tiles',)
  with pytest.raises(AttributeError):
    c.coreset.precentage = 0.1
  from configs import gpu_check, precision  # pylint: disable=g-import-not-at-top
  from configs.paper import comparison  # pylint: disable=g-import-not-at-top
  from patchcore_jax.jobs import sweep  # pylint: disable=g-import-not-at-top
  p = precision.get_config('dataset=mtd,percentages=0.01')
  assert p.sweep.dtypes == ('float32', 'bfloat16') and p.data.name == 'mtd'
  assert p.sweep.backbones == ('vgg16', 'efficientnet_lite2')
  sweep.validate(p)
  k = comparison.get_config('dataset=mtd,backbones=efficientnet_lite2')
  assert k.sweep.methods == ('patchcore', 'padim', 'spade', 'mahalanobis')
  assert k.data.transform == 'resize' and k.sweep.percentages == (0.1, 0.01)
  sweep.validate(k)
  assert gpu_check.get_config().job == 'gpu_check'
  with pytest.raises(ValueError, match='dataset must be mvtec or mtd'):
    comparison.get_config('dataset=visa')


def test_run_on_a_folder_without_masks(tmp_path):
  """Colab-style: experiment.run on a user's folder; no masks -> pixel metrics are null."""
  from configs import folder  # pylint: disable=g-import-not-at-top
  from patchcore_jax import data  # pylint: disable=g-import-not-at-top
  from patchcore_jax.jobs import experiment  # pylint: disable=g-import-not-at-top
  source = data.make_synthetic_dataset(str(tmp_path / 'gen'), 'tiles')
  mine = tmp_path / 'my_tiles'
  for sub in ('train/good', 'test/good', 'test/crack'):
    os.makedirs(mine / sub)
    names = sorted(os.listdir(os.path.join(source, sub)))[:12]
    for name in names:
      os.link(os.path.join(source, sub, name), mine / sub / name)
  config = folder.get_config()
  config.data.root = str(mine)
  config.data.image_size = 128
  config.data.resize = 128
  config.output.num_overlays = 0
  results = experiment.run(config, str(tmp_path / 'out'))
  r = results['my_tiles']
  assert r['pixel_auroc'] is None and r['au_pro'] is None
  assert r['image_auroc'] >= 0.9
  assert np.isfinite(r['fit_seconds'])
