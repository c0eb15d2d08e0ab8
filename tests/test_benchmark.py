"""Benchmark mode: the launcher's benchmark job, its records, and one compilation per shape."""
import importlib.util
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax import backbones
from patchcore_jax.jobs import benchmark
from patchcore_jax import coreset
from patchcore_jax import errors
from patchcore_jax import features
from patchcore_jax import knn
from patchcore_jax import model
from patchcore_jax import stages
from patchcore_jax import timing
from patchcore_jax.data import transforms

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIELDS = {'stage', 'mode', 'size', 'compile_seconds', 'median_seconds', 'min_seconds',
          'max_seconds', 'limit_seconds', 'efficiency', 'note'}
STAGES = {'backbone', 'embed', 'memory_bank', 'projection', 'coreset', 'knn', 'anomaly_maps'}


def test_benchmark_job_through_the_launcher(tmp_path):
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'launch.py'),
                         '--config=configs/benchmark.py:backbone=resnet18,size=tiny',
                         f'--workdir={tmp_path}', '--config.compare.torch=False'],
                        cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = json.load(open(tmp_path / 'benchmark.json'))
  assert all(set(r) == FIELDS for r in records)
  by_mode = {}
  for r in records:
    by_mode.setdefault(r['stage'], set()).add(r['mode'])
    assert 0 < r['min_seconds'] <= r['median_seconds'] <= r['max_seconds'], r
    if r['mode'] == 'jit':
      assert r['compile_seconds'] is not None and r['compile_seconds'] >= 0, r
    if r['limit_seconds'] is not None:
      assert np.isclose(r['efficiency'], r['limit_seconds'] / r['median_seconds']), r
  for stage in STAGES:
    assert {'jit', 'eager'} <= by_mode[stage], stage
  assert by_mode['decode'] == {'host', '2 threads'}
  assert 'unfold' in by_mode['embed']
  assert 'numpy' in by_mode['coreset'] and 'limit' in by_mode['read_bandwidth']
  assert ('faiss' in by_mode['knn']) == (importlib.util.find_spec('faiss') is not None)
  # Both bank sizes (scales 1 and 2 of 4 images x 8 x 8 patches), both coreset sizes each.
  coreset_jit = [r for r in records if r['stage'] == 'coreset' and r['mode'] == 'jit']
  assert len(coreset_jit) == 4 and all(r['limit_seconds'] for r in coreset_jit)
  assert '256 rows' in coreset_jit[0]['size'] and '512 rows' in coreset_jit[2]['size']
  table = (tmp_path / 'benchmark.md').read_text()
  assert table.count('| knn |') == sum(r['stage'] == 'knn' for r in records)
  assert 'size=tiny' in table and 'peak RSS' in table
  assert not any(r['stage'].startswith('end_to_end') for r in records)  # No data root given.


def test_bad_paths_are_refused_before_anything_is_written(tmp_path):
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config('backbone=resnet18,size=tiny')
  with config.unlocked():
    config.knn.model = str(tmp_path / 'missing')
    config.knn.images = str(tmp_path)
  with pytest.raises(errors.UserError, match='knn.model'):
    benchmark.run(config, str(tmp_path / 'out'))
  assert not (tmp_path / 'out').exists()


def test_timing_helpers_block_and_divide():
  calls = []

  def fn(x):
    calls.append(1)
    return x * 2
  times = timing.call_times(fn, (jnp.ones(3),), repeats=4, warmup=2, per=10)
  assert len(times) == 4 and len(calls) == 6 and all(t >= 0 for t in times)
  record = timing.record('knn', 'jit', 's', [3.0, 1.0, 2.0], limit=1.0)
  assert (record.median_seconds, record.min_seconds, record.max_seconds) == (2.0, 1.0, 3.0)
  assert record.efficiency == 0.5
  table = timing.markdown([record, timing.record('knn', 'faiss', 's', [4.0])])
  assert '| knn | s | faiss |' in table and '2.00x' in table


def test_comparison_loops_select_what_the_library_selects():
  """numpy, eager and the official torch loop time the same algorithm: identical selections."""
  rng = np.random.default_rng(0)
  projected_t = jnp.asarray(rng.normal(size=(8, 300)).astype(np.float32))
  init = coreset.initial_distances(projected_t, jax.random.key(0))
  norms = coreset.squared_norms(projected_t)
  ours = np.asarray(coreset.greedy_coreset_loop(projected_t, init, num_samples=12))
  points = np.asarray(projected_t).T.copy()
  np.testing.assert_array_equal(
      benchmark.numpy_greedy(points, np.asarray(norms), np.asarray(init), iterations=12), ours)
  np.testing.assert_array_equal(
      benchmark.official_greedy(points, np.asarray(init), iterations=12), ours)
  with jax.disable_jit():
    eager = coreset.greedy_coreset_loop(projected_t, init, num_samples=12)
  np.testing.assert_array_equal(np.asarray(eager), ours)


def test_generated_pngs_decode_like_the_pipeline(tmp_path):
  paths = benchmark.generated_pngs(str(tmp_path), count=3, size=40, seed=0)
  image = transforms.load_image(paths[0], resize=36, image_size=32)
  assert image.shape == (32, 32, 3) and 0.0 <= image.min() and image.max() <= 1.0
  assert len(set(open(p, 'rb').read() for p in paths)) == 3


def test_every_stage_compiles_once_per_shape():
  """Repeated calls with new values of the same shapes never trace again."""
  backbone = backbones.load_backbone('resnet18', random_seed=0)
  embed_fn = features.make_embed_fn(backbone, pretrain_dim=64, target_dim=32)
  rng = np.random.default_rng(0)
  for _ in range(3):
    embed_fn(jnp.asarray(rng.random((2, 32, 32, 3), dtype=np.float32)))
  assert embed_fn.func._cache_size() == 1

  # Projection: a padded last block compiles nothing new.
  before = coreset._project_block._cache_size()
  matrix = coreset.random_projection(jax.random.key(0), 16, 4)
  for n in (250, 270, 299):
    coreset.project(rng.normal(size=(n, 16)).astype(np.float32), matrix, block_size=100)
  assert coreset._project_block._cache_size() - before == 1

  # Greedy loop: chunks with other bounds reuse the executable.
  before = coreset._greedy_chunk._cache_size()
  projected_t = jnp.asarray(rng.normal(size=(4, 257)).astype(np.float32))
  init = coreset.initial_distances(projected_t, jax.random.key(0))
  for chunk in (3, 5, 40):
    coreset.greedy_coreset_loop(projected_t, init, num_samples=40, chunk_size=chunk)
  assert coreset._greedy_chunk._cache_size() - before == 1

  # kNN and the whole prediction.
  bank = knn.prepare_bank(rng.normal(size=(300, 32)).astype(np.float32), block_size=128)
  before = knn.batch_nearest_neighbours._cache_size()
  for _ in range(3):
    knn.batch_nearest_neighbours(jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32), bank)
  assert knn.batch_nearest_neighbours._cache_size() - before == 1
  screened = knn.prepare_bank(rng.normal(size=(600, 32)).astype(np.float32), block_size=32,
                              screen=True, screen_min_rows=0)
  assert knn.uses_screen(screened)
  before = knn.batch_nearest_neighbours._cache_size()
  for _ in range(3):
    knn.batch_nearest_neighbours(jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32), screened)
  assert knn.batch_nearest_neighbours._cache_size() - before == 1
  predict = stages.predict_fn(backbone, model.Settings(image_size=32, pretrain_dim=64,
                                                      target_dim=32))
  for _ in range(3):
    predict(backbone.variables, bank, jnp.asarray(rng.random((2, 32, 32, 3), dtype=np.float32)))
  assert predict._cache_size() == 1


def test_scale_part_generates_banks_block_by_block(tmp_path):
  bank = benchmark.GeneratedBank(40000, 32, seed=3, block=16384)
  whole = np.concatenate([benchmark.structured_bank(min(16384, 40000 - i), 32, seed=3,
                                                    stream=i // 16384 + 1)
                          for i in range(0, 40000, 16384)])
  np.testing.assert_array_equal(bank[16000:17000], whole[16000:17000])  # Across two blocks.
  np.testing.assert_array_equal(bank[39000:40000], whole[39000:])
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  config = benchmark_config.get_config('backbone=resnet18,size=tiny')
  with config.unlocked():
    config.parts = ('scale',)
    config.scale.rows = (20000,)
  records = benchmark.run(config, str(tmp_path))
  assert [r.stage for r in records] == ['scale_projection', 'scale_coreset', 'scale_knn']
  summary = json.load(open(tmp_path / 'scale.json'))
  assert summary[0]['rows'] == 20000 and summary[0]['picks'] == 200
  second = dict(summary[0], rows=40000, peak_rss_bytes=2 * summary[0]['peak_rss_bytes'])
  benchmark.plot_scale([summary, [second]], str(tmp_path / 'scale.png'))
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(tmp_path / 'scale.png').size == (900, 380)
  assert '20,000 x 1024 generated, 1.0% (200 picks)' in records[1].size
  assert records[1].limit_seconds > 0 and records[1].median_seconds > 0
