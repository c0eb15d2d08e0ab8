"""The bank sharded over a 4-device mesh (virtual CPU devices) against one device.

XLA_FLAGS must be set before JAX starts, so the checks run in a fresh process
(tests/sharded_check.py) and report back as JSON.
"""
import functools
import json
import os
import subprocess
import sys

import numpy as np
import pytest

# One process of checks, so all its tests on one worker (pytest -n 2 --dist loadgroup).
pytestmark = pytest.mark.xdist_group('sharded')

HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def _run_checks():
  """Once per worker process (a module fixture would run again when xdist interleaves other
  modules' tests with these)."""
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, os.path.join(HERE, 'sharded_check.py')], env=env,
                        capture_output=True, text=True, timeout=600, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture
def checks():
  return _run_checks()


def test_four_devices(checks):
  assert checks['devices'] == 4


def test_sharded_coreset_picks_what_one_device_picks(checks):
  assert checks['coreset_equal']
  assert checks['coreset_ties_equal']


def test_sharded_knn_equals_one_device(checks):
  for k in (1, 3):
    assert checks[f'knn{k}_distances_equal']
    assert checks[f'knn{k}_indices_equal']


def test_data_parallel_features(checks):
  assert checks['embed_sharded_over'] == 4
  assert checks['embed_max_difference'] <= 1e-5


def test_a_run_on_four_devices_matches_one_device(checks):
  """experiment.run with config.devices=4: data-parallel features, sharded coreset and search."""
  assert checks['run_devices'] == 4
  # The same coreset rows (features equal to float32 rounding; other rows differ by ~1).
  assert checks['run_bank_max_difference'] <= 1e-4
  one, four = checks['run_metrics']
  np.testing.assert_allclose(four, one, rtol=0, atol=1e-6)
  assert checks['run_score_max_relative_difference'] <= 1e-5
