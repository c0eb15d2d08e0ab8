"""The GPU check: refuses a CPU unless allowed, runs end to end on the CPU, compares honestly."""
import json
import os
import subprocess
import sys

import jax
import pytest

from configs import gpu_check as gpu_check_config
from patchcore_jax.jobs import gpu_check

from conftest import shared_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_refuses_to_start_without_a_gpu(tmp_path):
  if jax.default_backend() in gpu_check.GPU_BACKENDS:
    pytest.skip('this machine has a GPU')
  result = subprocess.run(
      [sys.executable, 'launch.py', '--config=configs/gpu_check.py',
       f'--workdir={tmp_path / "out"}', '--config.data.root=/nonexistent'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 2
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: the GPU check needs a GPU, but JAX's backend is 'cpu' (devices: ")
  assert '.[cuda12]' in last and '--config.allow_cpu=True' in last
  assert not os.path.exists(tmp_path / 'out')  # Nothing written.


def test_the_stored_cpu_reference_is_a_full_run():
  with open(gpu_check_config.REFERENCE) as f:
    reference = json.load(f)
  assert reference['ok'] and reference['environment']['backend'] == 'cpu'
  model = reference['model']
  assert model['num_test_images'] == len(model['scores']) == 83  # Every bottle test image.
  assert model['backbone'] == 'efficientnet_lite2' and model['percentage'] == 0.1


def test_compare_names_what_differs():
  reference = {'image_auroc': 0.99, 'pixel_auroc': 0.98, 'au_pro': None,
               'scores': {'a.png': 10.0, 'b.png': 20.0}}
  same = dict(reference, image_auroc=0.992, scores={'a.png': 10.01, 'b.png': 20.0})
  problems, diffs = gpu_check.compare(same, reference)
  assert problems == [] and diffs['score_max_rel'] == pytest.approx(1e-3)
  other = dict(reference, pixel_auroc=0.95, au_pro=0.9, scores={'a.png': 13.0, 'b.png': 20.0})
  problems, _ = gpu_check.compare(other, reference)
  assert any(p.startswith('pixel_auroc: 0.9500 here, 0.9800') for p in problems)
  assert any(p.startswith('au_pro: 0.9 here, None') for p in problems)
  assert any(p.startswith('1 of 2 image scores differ') and '30.00%' in p for p in problems)
  problems, _ = gpu_check.compare(dict(reference, scores={'c.png': 1.0}), reference)
  assert problems == ['the test images differ: 3 not in both']


def test_runs_end_to_end_on_the_cpu_when_allowed(tmp_path):
  """CI mode: 12 images, small batches, one repeat; every section written, the same picks and
  neighbours on both paths, the report rendered."""
  root = shared_path('data', 'mvtec_ad')
  config = gpu_check_config.get_config()
  with config.unlocked():
    config.allow_cpu = True
    config.data.root = root
    config.data.batch_size = 4
    config.check.max_images = 12
    config.check.batch_sizes = (2, 4)
    config.check.repeats = 1
    config.check.coreset_picks = 40
  report = gpu_check.run(config, str(tmp_path))
  with open(tmp_path / 'gpu_check.json') as f:
    assert json.load(f) == json.loads(json.dumps(report))
  assert report['ok'], report['problems']
  for section in ('environment', 'data', 'model', 'reference', 'pipeline', 'backbone', 'transfer',
                  'coreset', 'knn', 'memory'):
    assert section in report, section
  assert report['reference']['status'].startswith('not compared (check.max_images=12')
  assert report['model']['num_test_images'] == 12 and len(report['model']['scores']) == 12
  assert report['coreset']['same_picks'] and report['knn']['same_neighbours']
  assert {(r['batch_size'], r['dtype'], r['conv']) for r in report['backbone']} == {
      (2, 'float32', 'tuned'), (2, 'bfloat16', 'tuned'), (4, 'float32', 'tuned'),
      (4, 'bfloat16', 'tuned'), (2, 'float32', 'xla')}
  text = (tmp_path / 'gpu_check.md').read_text()
  assert text.startswith('# GPU check: ok') and '## Coreset: ' in text
  # The copy is pre-resized: shorter side 256.
  copied = report['model']['scores']
  assert all(name.startswith('bottle/test/') for name in copied)
