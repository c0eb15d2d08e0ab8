"""Acceptance on real data (MVTec AD bottle), against the official implementation's numbers.

Needs $PATCHCORE_SHARED (skips otherwise; CI sets it). The parity test also needs the random-weight
WideResNet-50-2 checkpoint made by shared/reference/make_wrn50_bnrand.py, given by
$PATCHCORE_WRN50_BNRAND (CI makes it when torch 2.14.1 + torchvision 0.29.1 can be installed).
"""
import csv
import os

import numpy as np
import pytest
from scipy import stats

from configs import mvtec
from patchcore_jax.jobs import experiment
from tests.conftest import shared_path


def _run(tmp_path, arg, **overrides):
  config = mvtec.get_config(arg)
  config.data.root = shared_path('data', 'mvtec_ad')
  config.output.num_overlays = 2
  for key, value in overrides.items():
    section, field = key.split('__')
    config[section][field] = value
  workdir = str(tmp_path)
  return experiment.run(config, workdir)['bottle'], workdir


def _check(result, reference):
  """Image and pixel AUROC at most 0.5 points below the reference, AU-PRO at most 1 point."""
  image, pixel, pro = reference
  assert result['image_auroc'] >= image - 0.005, result
  assert result['pixel_auroc'] >= pixel - 0.005, result
  assert result['au_pro'] >= pro - 0.01, result


def test_bottle_vgg16_coreset_1_percent(tmp_path):
  result, _ = _run(tmp_path, 'category=bottle,backbone=vgg16,percentage=0.01')
  assert result['memory_bank_size'] == 1638
  _check(result, (1.0000, 0.9646, 0.8951))


def test_bottle_efficientnet_lite2_coreset_10_percent(tmp_path):
  result, _ = _run(tmp_path, 'category=bottle,backbone=efficientnet_lite2,percentage=0.1')
  assert result['memory_bank_size'] == 16385
  _check(result, (1.0000, 0.9866, 0.9498))


def test_parity_with_official_wide_resnet50_full_bank(tmp_path):
  checkpoint = os.environ.get('PATCHCORE_WRN50_BNRAND')
  if not checkpoint:
    pytest.skip('needs $PATCHCORE_WRN50_BNRAND: the checkpoint written by '
                'shared/reference/make_wrn50_bnrand.py (torch 2.14.1 + torchvision 0.29.1)')
  reference_csv = shared_path('reference', 'wrn50_bnrand_bottle_full_bank_scores.csv')
  result, workdir = _run(tmp_path, 'category=bottle,backbone=wide_resnet50_2,percentage=1.0',
                         backbone__checkpoint=checkpoint, backbone__official_bn_probe_passes=2)
  with open(reference_csv) as f:
    ref = {row['path'].split('bottle/', 1)[1]: float(row['score']) for row in csv.DictReader(f)}
  with open(os.path.join(workdir, 'scores', 'bottle.csv')) as f:
    ours = {row['path'].split('bottle/', 1)[1]: float(row['score']) for row in csv.DictReader(f)}
  assert sorted(ours) == sorted(ref)
  names = sorted(ref)
  a, b = np.array([ours[n] for n in names]), np.array([ref[n] for n in names])
  assert stats.spearmanr(a, b).statistic >= 0.999
  np.testing.assert_allclose(a, b, rtol=2e-3)
  assert result['memory_bank_size'] == 163856
  assert abs(result['pixel_auroc'] - 0.9303) <= 0.002
  assert abs(result['au_pro'] - 0.7575) <= 0.002
