"""Sweeps: the greedy prefix property, random prefixes, learned proxies (Eq. 8), one sweep run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax import coreset
from patchcore_jax import errors
from patchcore_jax import sweep
from tests.conftest import write_tiny_folder


def _clustered(n, d, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(9, d)) * 4
  return (centres[rng.integers(0, 9, n)] + rng.normal(size=(n, d))).astype(np.float32)


def test_greedy_prefixes_are_the_smaller_coresets():
  bank = _clustered(6000, 48, seed=0)
  key = jax.random.key(3)
  prefixes = sweep.greedy_prefixes(bank, [0.25, 0.1, 0.01], key=key, projection_dim=16)
  for p in (0.1, 0.01):
    direct = np.asarray(coreset.approximate_greedy_coreset(bank, percentage=p, key=key,
                                                           projection_dim=16))
    np.testing.assert_array_equal(prefixes[p], direct)
  assert [len(prefixes[p]) for p in (0.25, 0.1, 0.01)] == [1500, 600, 60]


def test_random_prefixes_are_nested_distinct_samples():
  picks = sweep.random_prefixes(1000, [0.5, 0.1, 1.0], seed=1)
  assert len(set(picks[0.5])) == 500 and len(picks[1.0]) == 1000
  np.testing.assert_array_equal(picks[0.1], picks[0.5][:100])


def test_proxy_loss_matches_numpy():
  rng = np.random.default_rng(0)
  proxies, batch = rng.normal(size=(7, 5)), rng.normal(size=(11, 5))
  dist = np.linalg.norm(batch[:, None] - proxies[None], axis=-1)
  for sign, direction in (('softmin', -1.0), ('printed', 1.0)):
    w = np.exp(direction * dist / 0.7)
    w /= w.sum(1, keepdims=True)
    expected = np.mean(np.sum(w * dist**2, 1))
    got = sweep.proxy_loss(jnp.asarray(proxies, jnp.float32), jnp.asarray(batch, jnp.float32),
                           temperature=0.7, sign=sign)
    np.testing.assert_allclose(float(got), expected, rtol=1e-4)


def test_softmin_proxies_move_towards_the_bank():
  bank = _clustered(3000, 16, seed=2)
  proxies, losses = sweep.learned_proxies(bank, 30, seed=0, steps=150, batch_size=256,
                                          learning_rate=0.05)
  assert proxies.shape == (30, 16) and len(losses) == 150
  assert np.mean(losses[-20:]) < 0.9 * np.mean(losses[:20])
  printed, _ = sweep.learned_proxies(bank, 30, seed=0, steps=20, sign='printed')
  assert printed.shape == (30, 16) and np.all(np.isfinite(printed))
  with pytest.raises(ValueError, match='sign must be one of'):
    sweep.learned_proxies(bank, 30, sign='plus')


def _config(root):
  from configs.paper import fig5_subsampling  # pylint: disable=g-import-not-at-top
  config = fig5_subsampling.get_config('proxy_steps=5')
  config.data.name = 'folder'
  config.data.root = root
  config.data.image_size = config.data.resize = 64
  config.sweep.percentages = (1.0, 0.5, 0.1)
  return config


def test_a_sweep_writes_every_variant_report_and_plots(tmp_path):
  root = write_tiny_folder(str(tmp_path / 'parts'), np.random.default_rng(0), size=(64, 64))
  workdir = str(tmp_path / 'out')
  records = sweep.run(_config(root), workdir)
  variants = [(r['variant']['subsampler'], r['variant']['percentage'],
               r['variant'].get('proxy_sign')) for r in records]
  assert variants == [('none', 1.0, None)] + [('greedy', p, None) for p in (0.5, 0.1)] + [
      ('random', p, None) for p in (0.5, 0.1)] + [
          ('proxies', p, s) for p in (0.5, 0.1) for s in ('softmin', 'printed')]
  rows = 5 * 8 * 8  # 5 training images, an 8 x 8 grid at 64 px.
  assert [r['memory_bank_size'] for r in records[:3]] == [rows, rows // 2, rows // 10]
  for r in records:
    assert 0.0 < r['memory_bank_usage'] <= 1.0
    assert r['pixel_auroc'] is not None and r['misclassified'] is not None
  assert json.load(open(os.path.join(workdir, 'sweep.json'))) == json.loads(json.dumps(records))
  report = open(os.path.join(workdir, 'report.md')).read()
  assert '| greedy | 50 | 160 |' in report and 'The paper' in report
  assert os.path.isfile(os.path.join(workdir, 'plots', 'parts_image_auroc.png'))
  timings = json.load(open(os.path.join(workdir, 'timings.json')))
  assert timings['parts']['features_seconds'] > 0


def test_bad_sweep_fields_are_refused_by_name(tmp_path):
  config = _config(str(tmp_path))
  config.sweep.subsamplers = ('greedy', 'kmeans')
  with pytest.raises(errors.UserError, match=r'config.sweep.subsamplers=.*kmeans'):
    sweep.run(config, str(tmp_path / 'out'))
  config = _config(str(tmp_path))
  config.sweep.percentages = (0.1, 2.0)
  with pytest.raises(errors.UserError, match='config.sweep.percentages'):
    sweep.run(config, str(tmp_path / 'out'))
