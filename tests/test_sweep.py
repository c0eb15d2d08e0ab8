"""Sweeps: the greedy prefix property, random prefixes, learned proxies (Eq. 8), one sweep run."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax import coreset
from patchcore_jax import errors
from patchcore_jax import metrics
from patchcore_jax.jobs import sweep
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


def _greedy_config(tmp_path, seed, percentages):
  """A sweep of the greedy coreset at `percentages` on a tiny generated folder."""
  root = write_tiny_folder(str(tmp_path / 'parts'), np.random.default_rng(seed), size=(64, 64))
  config = _config(root)
  config.sweep.subsamplers = ('greedy',)
  config.sweep.percentages = percentages
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
  assert '| greedy | 50 % |  | 160 |' in report and 'The paper' in report
  assert 'Sec. 4.4.2' in report  # The Fig. 5 config's statements of the paper.
  for plot in ('image_auroc', 'roc', 'pr'):
    assert os.path.isfile(os.path.join(workdir, 'plots', f'parts_{plot}.png'))
  with open(os.path.join(workdir, 'scores', 'parts.csv')) as f:
    rows = [line.split(',') for line in f.read().splitlines()]
  assert rows[0][:3] == ['path', 'label', 'v0'] and len(rows[0]) == 2 + len(records)
  labels = [int(r[1]) for r in rows[1:]]
  for j, record in enumerate(records):  # Each column is the variant's image scores.
    scores = [float(r[2 + j]) for r in rows[1:]]
    assert metrics.image_auroc(labels, scores) == pytest.approx(record['image_auroc'])
  timings = json.load(open(os.path.join(workdir, 'timings.json')))
  assert timings['parts']['features'][0]['seconds'] > 0 and timings['wall_seconds'] > 0


def test_bad_sweep_fields_are_refused_by_name(tmp_path):
  config = _config(str(tmp_path))
  config.sweep.subsamplers = ('greedy', 'kmeans')
  with pytest.raises(errors.UserError, match=r'config.sweep.subsamplers=.*kmeans'):
    sweep.run(config, str(tmp_path / 'out'))
  config = _config(str(tmp_path))
  config.sweep.percentages = (0.1, 2.0)
  with pytest.raises(errors.UserError, match='config.sweep.percentages'):
    sweep.run(config, str(tmp_path / 'out'))


def test_feature_axes_backbone_ensemble_and_ivfpq(tmp_path):
  config = _greedy_config(tmp_path, 1, (1.0,))
  config.sweep.backbones = ('efficientnet_lite0', 'mobilenet_v2')
  config.sweep.patch_sizes = (1, 3)
  config.sweep.ensemble = True
  config.sweep.searches = ('exact', 'ivfpq')
  config.sweep.ivfpq.nlist = 4
  config.sweep.ivfpq.subquantizers = 16
  config.sweep.ivfpq.nprobe = (1, 4)
  config.sweep.overlays = 2
  workdir = str(tmp_path / 'out')
  records = sweep.run(config, workdir)
  single = [r for r in records if not r['variant']['backbone'].startswith('ensemble')]
  assert [(r['variant']['backbone'], r['variant']['patch_size'], r['variant']['search'],
           r['variant'].get('nprobe')) for r in single] == [
               (b, p, s, n) for b in ('efficientnet_lite0', 'mobilenet_v2') for p in (1, 3)
               for s, n in (('exact', None), ('ivfpq', 1), ('ivfpq', 4))]
  assert single[0]['variant']['stages'] == 'blocks.4+blocks.10'
  assert single[3]['variant']['stages'] == 'blocks.4+blocks.10'
  assert single[6]['variant']['stages'] == 'features.6+features.13'
  for r in single:
    assert r['ms_per_image'] > r['embed_ms_per_image'] > 0
    if r['variant']['search'] == 'ivfpq':
      assert 0.0 <= r['recall_at_1'] <= 1.0
      if r['variant']['nprobe'] == 4:  # Every cell visited: only the quantisation is left.
        assert r['recall_at_1'] >= [s for s in single if s['variant'].get('nprobe') == 1
                                    and s['variant']['patch_size'] == r['variant']['patch_size']
                                    and s['variant']['backbone'] == r['variant']['backbone']
                                    ][0]['recall_at_1']
  ensembles = [r for r in records if r['variant']['backbone'].startswith('ensemble')]
  assert len(ensembles) == 6  # One per (patch size, search, nprobe).
  assert ensembles[0]['ms_per_image'] == pytest.approx(sum(
      r['ms_per_image'] for r in single if r['variant']['patch_size'] == 1
      and r['variant']['search'] == 'exact'))
  assert ensembles[0]['variant']['backbone'] == 'ensemble:efficientnet_lite0+mobilenet_v2'
  # The ensemble's scores are the mean of the members' min-max normalised scores.
  with open(os.path.join(workdir, 'scores', 'parts.csv')) as f:
    table = [line.split(',') for line in f.read().splitlines()]
  column = lambda j: np.array([float(r[2 + j]) for r in table[1:]])
  norm = lambda x: (x - x.min()) / (x.max() - x.min())
  members = [records.index(r) for r in single if r['variant']['patch_size'] == 1
             and r['variant']['search'] == 'exact']
  np.testing.assert_allclose(column(records.index(ensembles[0])),
                             (norm(column(members[0])) + norm(column(members[1]))) / 2, rtol=1e-5)
  assert len(os.listdir(os.path.join(workdir, 'overlays', 'parts'))) == 2
  report = open(os.path.join(workdir, 'report.md')).read()
  assert '| recall@1 | index s |' in report and 'ensemble:efficientnet_lite0+mobilenet_v2' in report


def test_low_shot_banks_and_hierarchies(tmp_path):
  config = _greedy_config(tmp_path, 2, (1.0, 0.5))
  config.sweep.hierarchies = ('2+3', '1+2+3')
  config.sweep.shots = (1, 3)
  config.sweep.seeds = (0, 1)
  workdir = str(tmp_path / 'out')
  records = sweep.run(config, workdir)
  assert len(records) == 2 * 2 * 2 * 2
  for r in records:
    v = r['variant']
    grid = 8 * 8 if v['hierarchy'] == '2+3' else 16 * 16  # Level 1 is at stride 4.
    rows = v['shots'] * grid
    assert r['memory_bank_size'] == (rows if v['percentage'] == 1.0 else rows // 2)
  assert records[-1]['variant']['stages'] == 'blocks.3+blocks.6+blocks.14'
  report = open(os.path.join(workdir, 'report.md')).read()
  assert 'mean ± std over 2 seeds' in report
  config.sweep.shots = (6,)
  with pytest.raises(errors.UserError, match='only 5 training images'):
    sweep.run(config, str(tmp_path / 'out2'))
  assert not os.path.exists(tmp_path / 'out2')  # Refused before any work.


def test_scoring_axes_share_one_bank(tmp_path):
  config = _greedy_config(tmp_path, 3, (1.0,))
  config.sweep.ks = (1, 3)
  config.sweep.distances = ('squared_l2', 'l2')
  config.sweep.reweights = (False, True)
  records = sweep.run(config, str(tmp_path / 'out'))
  assert [(r['variant']['k'], r['variant']['distance'], r['variant']['reweight'])
          for r in records] == [(k, d, w) for k in (1, 3) for d in ('squared_l2', 'l2')
                                for w in (False, True)]
  # l2 is the square root of squared_l2 at k = 1 without Eq. 7: the same ranking.
  assert records[0]['image_auroc'] == records[2]['image_auroc']
  config.sweep.searches = ('ivfpq',)
  with pytest.raises(errors.UserError, match='reweighting needs the exact search'):
    sweep.run(config, str(tmp_path / 'out2'))


def test_every_paper_config_builds_and_validates():
  import importlib  # pylint: disable=g-import-not-at-top
  import pkgutil  # pylint: disable=g-import-not-at-top
  from configs import paper  # pylint: disable=g-import-not-at-top
  from patchcore_jax.jobs import config as config_lib  # pylint: disable=g-import-not-at-top
  names = [m.name for m in pkgutil.iter_modules(paper.__path__)]
  assert {'table1_mvtec', 'table4_variants', 'table5_inference', 'fig4_patch_size',
          'fig4_hierarchies', 'fig5_subsampling', 'stride', 'tableS5_lowshot',
          'table6_mtd'} <= set(names)
  for name in names:
    module = importlib.import_module(f'configs.paper.{name}')
    assert 'python launch.py --config=configs/paper/' in module.__doc__
    for arg in (('part=resolution', 'part=hierarchies', 'part=ensemble')
                if name == 'table4_variants' else (None,)):
      config = module.get_config(arg)
      assert config.job == 'sweep' and config.sweep.paper
      assert config.sweep.paper_statements == paper.statements(config.sweep.paper)
      sweep.validate(config)
      config_lib.read_experiment(config)


def test_several_categories_get_a_mean(tmp_path):
  config = _config(str(tmp_path / 'data'))
  config.data.name = 'synthetic'
  config.data.categories = ('weave', 'tiles')
  config.data.max_train_images = 6
  config.sweep.subsamplers = ('greedy',)
  config.sweep.percentages = (1.0, 0.1)
  records = sweep.run(config, str(tmp_path / 'out'))
  assert [(r['category'], r['variant']['percentage']) for r in records] == [
      (c, p) for c in ('weave', 'tiles') for p in (1.0, 0.1)]
  assert records[0]['memory_bank_size'] == 6 * 8 * 8  # max_train_images, as an experiment run.
  report = open(os.path.join(tmp_path, 'out', 'report.md')).read()
  mean = np.mean([r['image_auroc'] for r in records if r['variant']['percentage'] == 0.1])
  std = np.std([r['image_auroc'] for r in records if r['variant']['percentage'] == 0.1])
  assert '## Mean ± std over 2 categories' in report
  assert f'| 10 % | 2 | {100 * mean:.2f} ± {100 * std:.2f} |' in report
  total = sum(r['misclassified'] for r in records if r['variant']['percentage'] == 0.1)
  row = next(line for line in report.splitlines() if '| 10 % | 2 |' in line)
  assert row.endswith(f'| {total} |')  # Table 1's last row: misclassified over categories.


def test_shot_banks_are_the_rows_of_the_drawn_images():
  train = np.arange(10 * 4 * 3, dtype=np.float32).reshape(40, 3)  # 10 images x 4 patches.
  features = sweep.Features(train=train, test=None, labels=None, masks=None, has_masks=False,
                            seconds=0.0)
  config = _config('unused')
  config.sweep.shots = (1, 3)
  config.sweep.seeds = (0, 1)
  banks = list(sweep.shot_banks(features, 4, config))
  assert [v for v, _ in banks] == [dict(shots=n, shot_seed=s) for n in (1, 3) for s in (0, 1)]
  for variant, bank in banks:
    images = sorted({int(row[0]) // 12 for row in bank})  # Each image holds 4 rows of 3.
    assert len(images) == variant['shots'] and bank.shape == (4 * variant['shots'], 3)
    expected = np.sort(np.random.default_rng(variant['shot_seed']).choice(
        10, variant['shots'], replace=False))
    assert images == expected.tolist()
    np.testing.assert_array_equal(bank, np.concatenate([train[4 * i:4 * i + 4] for i in images]))
  assert not np.array_equal(banks[2][1], banks[3][1])  # Seeds draw different images.
  config.sweep.shots = ()
  [(variant, bank)] = list(sweep.shot_banks(features, 4, config))
  assert variant == {} and bank is train


def test_a_signal_leaves_the_sweep_interrupted_not_failed(tmp_path, monkeypatch):
  import signal  # pylint: disable=g-import-not-at-top
  from patchcore_jax.jobs import workdir as workdir_lib  # pylint: disable=g-import-not-at-top

  def category(*args, **kwargs):
    os.kill(os.getpid(), signal.SIGTERM)  # What `timeout` or a scheduler sends mid-category.
    for _ in range(10**6):
      pass

  monkeypatch.setattr(sweep, '_category', category)
  with pytest.raises(workdir_lib.Interrupted) as info:
    sweep.run(_greedy_config(tmp_path, 0, (0.5,)), str(tmp_path / 'out'))
  assert info.value.exit_status == 143
  status = json.load(open(tmp_path / 'out' / 'status.json'))
  assert status['status'] == 'interrupted' and status['signal'] == 'SIGTERM'
  assert status['done'] == [] and 'error' not in status


def test_baselines_run_beside_patchcore_on_the_same_backbone(tmp_path):
  """sweep.methods: PaDiM, SPADE and MahalanobisAD beside PatchCore, each with its own stages;
  the baselines' records carry metrics (MahalanobisAD: image level only, saying why) and times,
  and their score columns are the image scores."""
  config = _greedy_config(tmp_path, 5, (0.1,))
  config.backbone.name = 'resnet18'
  config.backbone.random_seed = 0
  config.sweep.methods = ('patchcore', 'padim', 'spade', 'mahalanobis')
  records = sweep.run(config, str(tmp_path / 'out'))
  assert [r['variant']['method'] for r in records] == ['patchcore', 'padim', 'spade',
                                                       'mahalanobis']
  by_method = {r['variant']['method']: r for r in records}
  assert by_method['padim']['variant']['stages'] == 'layer1+layer2+layer3'
  assert by_method['spade']['variant']['stages'] == 'layer1+layer2+layer3+layer4'
  assert by_method['mahalanobis']['variant']['stages'] == 'layer1+layer2+layer3+layer4'
  for method in ('padim', 'spade'):
    r = by_method[method]
    assert 0.0 <= r['image_auroc'] <= 1.0 and r['pixel_auroc'] is not None, method
    assert r['ms_per_image'] > 0 and r['fit_seconds'] > 0 and r['memory_bank_size'] is None
  m = by_method['mahalanobis']
  assert m['pixel_auroc'] is None and 'whole images' in m['metric_notes']['pixel_auroc']
  report = open(tmp_path / 'out' / 'report.md').read()
  assert '| spade |' in report and '| mahalanobis |' in report
  with pytest.raises(errors.UserError, match=r"config.sweep.methods=\('patchcore', 'knn'\)"):
    config.sweep.methods = ('patchcore', 'knn')
    sweep.run(config, str(tmp_path / 'bad'))
