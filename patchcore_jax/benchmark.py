"""Benchmark mode: every PatchCore stage under jit and eagerly, against this machine's limits.

  python launch.py --config=configs/benchmark.py:backbone=wide_resnet50_2 --workdir=DIR

Random weights and generated inputs, so it runs anywhere. For every stage and size it records the
compile time (`jax.jit(f).lower(...).compile()`, separately), the steady state of the compiled
function over repeated calls (after a warm-up; inputs already on the device; every call ends in
`block_until_ready()`), and the same stage under `jax.disable_jit()` ('eager'). In the same process
it measures the machine's limits for the same work: a plain `jnp.dot` of the kNN's and the
projection's shapes, and the fastest of three ways to read the projected bank once (the bytes one
greedy-coreset iteration reads). Side by side, what users would otherwise run: faiss-cpu
`IndexFlatL2` for the kNN (optional), a plain numpy greedy loop for the coreset, and torchvision in
torch eager mode for ResNet backbones (optional).

Outputs in DIR: `benchmark.json` (a list of records, see `Record`), `benchmark.md` (the table with
the machine and command) and `config.json`.
"""
import dataclasses
import functools
import inspect
import json
import os
import platform
import resource
import time
from typing import Optional

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from patchcore_jax import backbones
from patchcore_jax import coreset
from patchcore_jax import features as features_lib
from patchcore_jax import knn
from patchcore_jax import patchcore
from patchcore_jax import scoring


# What `config.parts` can select; 'bank' is projection, coreset and kNN over generated banks.
PARTS = ('preprocess', 'backbone', 'embed', 'memory_bank', 'anomaly_maps', 'bank')


@dataclasses.dataclass
class Record:
  """One timed (stage, mode, size). Seconds are per call unless `size` says per image/iteration.

  limit_seconds: the machine-limit time for the same work, measured in the same process.
  efficiency: limit_seconds / median_seconds.
  note: how the row was measured, when that is not obvious (e.g. iterations timed).
  """
  stage: str
  mode: str  # 'jit' | 'eager' | 'faiss' | 'numpy' | 'torch' | 'limit'
  size: str
  compile_seconds: Optional[float]
  median_seconds: float
  min_seconds: float
  max_seconds: float
  limit_seconds: Optional[float] = None
  efficiency: Optional[float] = None
  note: str = ''


def _call_times(fn, args, *, repeats, warmup=1, per=1.0):
  """Wall times of `repeats` calls of fn(*args), each blocked until ready, divided by `per`."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) / per)
  return times


def compile_fn(fn, args):
  """(compiled, seconds) for `jax.jit(fn)` lowered and compiled at `args`."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def _record(stage, mode, size, times, *, compile_seconds=None, limit=None, note=''):
  median = float(np.median(times))
  return Record(stage, mode, size, compile_seconds, median, float(min(times)), float(max(times)),
                limit, None if limit is None else limit / median, note)


def time_jit(stage, size, fn, args, *, repeats, per=1.0, limit=None, note=''):
  """Compile once (timed), then time the compiled function."""
  compiled, seconds = compile_fn(fn, args)
  times = _call_times(compiled, args, repeats=repeats, per=per)
  return _record(stage, 'jit', size, times, compile_seconds=seconds, limit=limit, note=note)


def time_eager(stage, size, fn, args, *, repeats, per=1.0, limit=None, note=''):
  """fn(*args) op by op under `jax.disable_jit()` (one warm-up call first)."""
  with jax.disable_jit():
    times = _call_times(fn, args, repeats=repeats, per=per)
  return _record(stage, 'eager', size, times, limit=limit, note=note)


def read_seconds(x, *, repeats):
  """Median seconds of the fastest of three kernels that read all of x [d, N] once."""
  kernels = {
      'sum': jnp.sum,
      'max': jnp.max,
      'ones-matvec': lambda a: jnp.dot(jnp.ones((a.shape[0],), a.dtype), a,
                                       precision=lax.Precision.HIGHEST),
  }
  best = None
  for name, kernel in kernels.items():
    compiled, _ = compile_fn(kernel, (x,))
    median = float(np.median(_call_times(compiled, (x,), repeats=repeats)))
    if best is None or median < best[1]:
      best = (name, median)
  return best


def dot_seconds(a, b, *, repeats):
  """Median seconds of a plain `a @ b.T` (float32, 'highest') with the arguments on the device."""
  compiled, _ = compile_fn(lambda x, y: jnp.dot(x, y.T, precision=lax.Precision.HIGHEST), (a, b))
  return float(np.median(_call_times(compiled, (a, b), repeats=repeats)))


def peak_rss_bytes():
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes():
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def numpy_greedy(points, norms, min_dist, *, iterations):
  """The plain greedy loop in numpy on points [N, d]: what a user would write; returns indices."""
  selected = []
  for _ in range(iterations):
    i = int(np.argmax(min_dist))
    selected.append(i)
    dist = np.maximum(norms - 2.0 * (points @ points[i]) + norms[i], 0.0)
    min_dist = np.minimum(min_dist, dist)
  return selected


def eager_greedy(projected_t, norms, min_dist, *, iterations):
  """`iterations` of the library's loop body, called one by one (for eager timing)."""
  carry = (min_dist, jnp.zeros((iterations,), jnp.int32))
  for i in range(iterations):
    carry = coreset._greedy_body(i, carry, projected_t=projected_t, norms=norms,  # pylint: disable=protected-access
                                 precision=lax.Precision.HIGHEST)
  return carry


def _mb(num_bytes):
  return f'{num_bytes / 2**20:.0f} MiB'


def machine_description():
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return (f'{model}, {os.cpu_count()} CPU cores, JAX {jax.__version__} on '
          f'{jax.devices()[0].platform}, Python {platform.python_version()}')


def bench_bank_and_coreset(config, *, patches_per_image, dim, rng):
  """Projection, coreset and kNN stages for every bank size; also memory. -> (records, memory)."""
  records, memory = [], {}
  for scale in config.bank.scales:
    n = config.bank.num_images * patches_per_image * scale
    label = f'{config.bank.num_images * scale} img x {patches_per_image} x {dim} ({n:,} rows)'
    rss_before = rss_bytes()
    bank = patchcore.empty_host_bank(n, dim)  # [N, D] host memory bank, as build_memory_bank's.
    rng.standard_normal(dtype=np.float32, out=bank)
    if scale == config.bank.scales[0]:
      # The fit's memory: the library's own subsampling of the host bank (projection, initial
      # distances, greedy loop, selected rows), before any other copy is made.
      percentage = min(config.bank.percentages)
      start = time.perf_counter()
      patchcore.subsample(bank, percentage=percentage, key=jax.random.key(config.seed),
                          projection_dim=config.bank.projection_dim)
      memory = {'bank_rows': n, 'bank_bytes': bank.nbytes, 'percentage': percentage,
                'projection_bytes': n * config.bank.projection_dim * 4,
                'rss_before_bank_bytes': rss_before, 'peak_rss_bytes': peak_rss_bytes(),
                'subsample_seconds': time.perf_counter() - start}
    projection_records, projected_t = bench_projection(config, bank, label=label)
    records += projection_records
    records += bench_coreset(config, projected_t, label=label)
    del projected_t
    # kNN per image over coresets of this bank.
    queries = jax.device_put(
        rng.standard_normal((config.batch_size, patches_per_image, dim), dtype=np.float32))
    for percentage in config.bank.percentages:
      m = int(n * percentage)
      records.extend(bench_knn(config, bank[:m], queries, label=f'{m:,}-row bank '
                               f'({percentage:.0%} of {n:,})'))
    del bank
  return records, memory


def bench_projection(config, bank, *, label):
  """Host bank [N, D] -> device [d, N], block by block. -> (records, the projection)."""
  t = config.timing
  n, dim = bank.shape
  matrix = coreset.random_projection(jax.random.key(config.seed), dim, config.bank.projection_dim)
  block = inspect.signature(coreset.project).parameters['block_size'].default
  block_args = (np.zeros((min(block, n), dim), np.float32), matrix)
  _, compile_seconds = compile_fn(coreset._project_block, block_args)  # pylint: disable=protected-access
  limit = dot_seconds(jax.device_put(bank), matrix.T, repeats=t.repeats)
  project = lambda: coreset.project(bank, matrix)
  times = _call_times(project, (), repeats=t.repeats)
  flops = 2 * n * dim * config.bank.projection_dim
  records = [_record('projection', 'jit', label, times, compile_seconds=compile_seconds,
                     limit=limit, note=f'limit: the same dot on a device-resident bank, '
                     f'{flops / limit / 1e9:.0f} GFLOP/s; ours reads the host bank in blocks of '
                     f'{block} rows')]
  with jax.disable_jit():
    times = _call_times(project, (), repeats=t.eager_repeats)
  records.append(_record('projection', 'eager', label, times, limit=limit))
  return records, project()


def bench_coreset(config, projected_t, *, label):
  """Greedy coreset over projected_t [d, N], seconds per iteration: jit per percentage, eager
  and numpy once (the work per iteration does not depend on the percentage)."""
  t = config.timing
  d, n = projected_t.shape
  init = coreset.initial_distances(projected_t, jax.random.key(1))
  norms = coreset.squared_norms_jit(projected_t)
  read_kernel, read_limit = read_seconds(projected_t, repeats=max(t.repeats, 10))
  records = [_record('read_bandwidth', 'limit', f'[{d}, {n:,}] f32 ({_mb(projected_t.nbytes)})',
                     [read_limit], note=f'{projected_t.nbytes / read_limit / 1e9:.1f} GB/s '
                     f'({read_kernel}, fastest of sum/max/ones-matvec)')]
  chunk = functools.partial(coreset._greedy_chunk, precision='highest')  # pylint: disable=protected-access
  sizes = []
  for percentage in config.bank.percentages:
    num_samples = int(n * percentage)
    iters = min(num_samples, t.coreset_iterations)
    compiled, compile_seconds = compile_fn(
        chunk, (projected_t, norms, init, jnp.zeros((num_samples,), jnp.int32), 0, iters))

    def run_loop(stop, compiled=compiled, num_samples=num_samples):
      min_dist = jnp.array(init)  # Donated by the loop: a fresh copy per call, made untimed.
      selected = jnp.zeros((num_samples,), jnp.int32)
      jax.block_until_ready((min_dist, selected))
      start = time.perf_counter()
      jax.block_until_ready(compiled(projected_t, norms, min_dist, selected, 0, stop))
      return time.perf_counter() - start

    run_loop(min(iters, 10))  # Warm-up (bounds are traced: the same executable).
    times = [run_loop(iters) / iters for _ in range(t.coreset_repeats)]
    sizes.append(f'{label}, {percentage:.0%} ({num_samples:,} iterations)')
    timed = (f'first {iters:,} of {num_samples:,} iterations timed' if iters < num_samples
             else 'all iterations timed')
    records.append(_record(
        'coreset', 'jit', sizes[-1], times, compile_seconds=compile_seconds, limit=read_limit,
        note=f'every iteration reads the whole projected bank, so its cost does not depend on '
             f'the iteration; {timed}; the whole coreset takes about '
             f'{_fmt(num_samples * np.median(times))}'))
  # Labelled as the first percentage's jit row, so that the table compares them.
  eager_iters = t.coreset_eager_iterations
  with jax.disable_jit():
    times = _call_times(lambda: eager_greedy(projected_t, norms, init, iterations=eager_iters),
                        (), repeats=t.eager_repeats, per=eager_iters)
  records.append(_record('coreset', 'eager', sizes[0], times, limit=read_limit,
                         note=f'{eager_iters} iterations of the loop body timed'))
  points = np.ascontiguousarray(np.asarray(projected_t).T)  # [N, d], the natural numpy layout.
  np_norms, np_init = np.asarray(norms), np.asarray(init)
  times = _call_times(lambda: numpy_greedy(points, np_norms, np_init,
                                           iterations=t.numpy_iterations), (),
                      repeats=t.eager_repeats, warmup=0, per=t.numpy_iterations)
  records.append(_record('coreset', 'numpy', sizes[0], times, limit=read_limit,
                         note=f'{t.numpy_iterations} iterations of a plain numpy loop on [N, d]'))
  return records


def bench_knn(config, bank_rows, queries, *, label):
  """kNN of a batch of images' patches against `bank_rows` [M, D]: jit, eager, faiss, limit."""
  t = config.timing
  b, p, d = queries.shape
  m = bank_rows.shape[0]
  bank = knn.prepare_bank(bank_rows, block_size=config.knn.block_size)
  fn = functools.partial(knn.batch_nearest_neighbours, k=1, precision=config.knn.precision)
  limit = dot_seconds(queries.reshape(b * p, d), jax.device_put(bank_rows), repeats=t.repeats) / b
  flops = 2 * p * d * m
  size = f'{p} queries x {label}, per image (batch {b})'
  records = [
      time_jit('knn', size, fn, (queries, bank), repeats=t.repeats, per=b, limit=limit,
               note=f'float32 scan; limit: plain float32 jnp.dot of the same shapes, '
               f'{flops / limit / 1e9:.0f} GFLOP/s'),
      time_eager('knn', size, fn, (queries, bank), repeats=t.eager_repeats, per=b, limit=limit,
                 note='float32 scan'),
  ]
  # Timed on every bank, also below knn.SCREEN_MIN_ROWS where the library keeps the scan.
  screened = knn.prepare_bank(bank_rows, block_size=config.knn.block_size, screen=True,
                              screen_min_rows=0)
  if config.knn.screen and knn.uses_screen(screened):
    want = fn(queries, bank)[1]
    got = fn(queries, screened)[1]
    same = float(jnp.mean(got == want))
    records += [
        time_jit('knn_screened', size, fn, (queries, screened), repeats=t.repeats, per=b,
                 limit=limit, note=f'bfloat16 screen + float32 check; same index as the float32 '
                 f'scan for {same:.2%} of queries; limit: the float32 dot'
                 + ('' if m >= knn.SCREEN_MIN_ROWS else
                    f'; below {knn.SCREEN_MIN_ROWS} rows the library uses the scan')),
        time_eager('knn_screened', size, fn, (queries, screened), repeats=t.eager_repeats,
                   per=b, limit=limit),
    ]
  del screened
  if config.compare.faiss:
    try:
      import faiss  # pylint: disable=g-import-not-at-top
    except ImportError:
      logging.warning('faiss is not installed: no faiss rows (pip install faiss-cpu)')
    else:
      faiss.omp_set_num_threads(os.cpu_count())
      index = faiss.IndexFlatL2(d)
      index.add(np.ascontiguousarray(bank_rows))
      flat_queries = np.asarray(queries).reshape(b * p, d)
      times = _call_times(lambda: index.search(flat_queries, 1), (), repeats=t.repeats, per=b)
      records.append(_record('knn', 'faiss', size, times, limit=limit,
                             note=f'faiss {faiss.__version__} IndexFlatL2, k=1'))
  return records


def bench_backbone(config):
  """Preprocessing, backbone, patch embedding, memory-bank build and anomaly maps."""
  t = config.timing
  b, s = config.batch_size, config.image_size
  rng = np.random.default_rng(config.seed)
  records = []

  parts = set(config.parts)
  raw = jax.device_put(rng.integers(0, 256, (b, config.raw_size, config.raw_size, 3), np.uint8))
  fn = functools.partial(features_lib.preprocess, image_size=s, resize=config.resize)
  size = f'{config.raw_size}px uint8 -> {s}px, per image (batch {b})'
  if 'preprocess' in parts:
    records.append(time_jit('preprocess', size, fn, (raw,), repeats=t.repeats, per=b))
    records.append(time_eager('preprocess', size, fn, (raw,), repeats=t.eager_repeats, per=b))

  backbone = backbones.load_backbone(config.backbone.name, stages=config.backbone.stages,
                                     random_seed=config.seed)
  if config.backbone.fold_batchnorm:
    backbone = backbones.fold_batchnorm(backbone)
  images = fn(raw)
  size = f'{s}px to {"+".join(backbone.stages)}, per image (batch {b})'
  if 'backbone' in parts:
    records.append(time_jit('backbone', size, backbone.model.apply, (backbone.variables, images),
                            repeats=t.repeats, per=b))
    records.append(time_eager('backbone', size, backbone.model.apply,
                              (backbone.variables, images), repeats=t.eager_repeats, per=b))
    if config.compare.torch:
      records.extend(bench_torch_backbone(config, backbone, per=b))

  maps = jax.jit(backbone.apply)(images)
  stage_maps = [maps[name] for name in backbone.stages]
  embed = functools.partial(features_lib.patch_features, patch_size=config.features.patch_size,
                            pretrain_dim=config.features.pretrain_dim,
                            target_dim=config.features.target_dim)
  shapes = ' + '.join('x'.join(map(str, m.shape[1:])) for m in stage_maps)
  size = f'{shapes} -> {config.features.target_dim}, per image (batch {b})'
  if 'embed' in parts:
    records.append(time_jit('embed', size, embed, (stage_maps,), repeats=t.repeats, per=b))
    records.append(time_eager('embed', size, embed, (stage_maps,), repeats=t.eager_repeats,
                              per=b))

  # Memory bank: images -> backbone -> embedding -> host bank, as at fit time.
  if 'memory_bank' in parts:
    embed_fn = features_lib.make_embed_fn(backbone, patch_size=config.features.patch_size,
                                          pretrain_dim=config.features.pretrain_dim,
                                          target_dim=config.features.target_dim)
    num = config.memory_bank_images
    unit = rng.random((b, s, s, 3), dtype=np.float32)
    batches = [(unit, None, min(b, num - i)) for i in range(0, num, b)]
    _, compile_seconds = compile_fn(embed_fn, (unit,))
    build = lambda: patchcore.build_memory_bank(embed_fn, batches, num_images=num)
    size = f'{num} images of {s}px, per image'
    times = _call_times(build, (), repeats=t.repeats, per=num)
    records.append(_record('memory_bank', 'jit', size, times, compile_seconds=compile_seconds,
                           note='backbone + embedding + copy into the host bank'))
    with jax.disable_jit():
      eager_batches = batches[:1]
      count = eager_batches[0][2]
      times = _call_times(lambda: patchcore.build_memory_bank(embed_fn, eager_batches,
                                                              num_images=count), (),
                          repeats=t.eager_repeats, per=count)
    records.append(_record('memory_bank', 'eager', size, times, note=f'{count} images timed'))

  grid = stage_maps[0].shape[1:3]
  grid_scores = jax.device_put(rng.random((b,) + grid, dtype=np.float32))
  fn = functools.partial(scoring.anomaly_maps, size=(s, s), sigma=4.0)
  size = f'{grid[0]}x{grid[1]} -> {s}x{s}, sigma 4, per image (batch {b})'
  if 'anomaly_maps' in parts:
    records.append(time_jit('anomaly_maps', size, fn, (grid_scores,), repeats=t.repeats, per=b))
    records.append(time_eager('anomaly_maps', size, fn, (grid_scores,),
                              repeats=t.eager_repeats, per=b))
  return records


def bench_torch_backbone(config, backbone, *, per):
  """torchvision's model in torch eager mode, same input size and stages (ResNets only)."""
  if config.backbone.name not in backbones.resnet.ARCHS:
    return []
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torchvision  # pylint: disable=g-import-not-at-top
  except (ImportError, RuntimeError) as e:
    logging.warning('torch/torchvision not importable (%s): no torch rows', e)
    return []
  torch.set_num_threads(os.cpu_count())
  model = getattr(torchvision.models, config.backbone.name)().eval()
  last = max(backbones.resnet.STAGES.index(s) for s in backbone.stages)

  def forward(x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = []
    for i in range(1, last + 1):
      x = getattr(model, f'layer{i}')(x)
      out.append(x)
    return out

  x = torch.randn(config.batch_size, 3, config.image_size, config.image_size)
  with torch.inference_mode():
    forward(x)
    times = []
    for _ in range(config.timing.repeats):
      start = time.perf_counter()
      forward(x)
      times.append((time.perf_counter() - start) / per)
  size = (f'{config.image_size}px to {"+".join(backbone.stages)}, per image '
          f'(batch {config.batch_size})')
  return [_record('backbone', 'torch', size, times,
                  note=f'torch {torch.__version__} eager, torchvision {torchvision.__version__}, '
                       f'{torch.get_num_threads()} threads')]


def run(config, workdir):
  """Runs every benchmark of `config` and writes DIR/benchmark.{json,md}."""
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  rng = np.random.default_rng(config.seed)
  stride = backbones.build_model(config.backbone.name, config.backbone.stages)[1][
      config.backbone.stages[0]]
  patches = (config.image_size // stride) ** 2
  unknown = set(config.parts) - set(PARTS)
  if unknown:
    raise ValueError(f'unknown benchmark parts {sorted(unknown)}; known: {PARTS}')
  records, memory = [], {}
  if 'bank' in config.parts:
    # Bank and coreset first, so that the peak memory reported is theirs alone.
    records, memory = bench_bank_and_coreset(config, patches_per_image=patches,
                                             dim=config.features.target_dim, rng=rng)
  if set(config.parts) - {'bank'}:
    records = bench_backbone(config) + records
  with open(os.path.join(workdir, 'benchmark.json'), 'w') as f:
    json.dump([dataclasses.asdict(r) for r in records], f, indent=1)
  table = markdown(records, machine=machine_description(), memory=memory, config=config)
  with open(os.path.join(workdir, 'benchmark.md'), 'w') as f:
    f.write(table)
  logging.info('\n%s', table)
  return records


def _fmt(seconds):
  if seconds is None:
    return ''
  return f'{seconds * 1e3:.3g} ms' if seconds < 1 else f'{seconds:.3g} s'


def markdown(records, *, machine, memory, config):
  """The records as a markdown table; eager/faiss/numpy/torch rows compare with the jit row."""
  jit = {(r.stage, r.size): r.median_seconds for r in records if r.mode == 'jit'}
  lines = [
      f'Machine: {machine}.',
      f'Command: `python launch.py --config=configs/benchmark.py:backbone={config.backbone.name}'
      f'{",size=" + config.size if config.size != "full" else ""} --workdir=DIR`.',
      '',
      '| stage | size | mode | compile | median | min | max | limit | efficiency | jit speed-up |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in records:
    ratio = ''
    if r.mode != 'jit' and (r.stage, r.size) in jit:
      ratio = f'{r.median_seconds / jit[(r.stage, r.size)]:.2f}x'
    eff = '' if r.efficiency is None else f'{r.efficiency:.0%}'
    lines.append(f'| {r.stage} | {r.size} | {r.mode} | {_fmt(r.compile_seconds)} | '
                 f'{_fmt(r.median_seconds)} | {_fmt(r.min_seconds)} | {_fmt(r.max_seconds)} | '
                 f'{_fmt(r.limit_seconds)} | {eff} | {ratio} |')
  notes = [f'- {r.stage} / {r.mode} / {r.size}: {r.note}' for r in records if r.note]
  lines += ['', 'Notes:'] + notes
  if memory:
    lines += ['', f'Fit memory and time: `patchcore.subsample` of the {memory["bank_rows"]:,}-row '
              f'host bank to {memory["percentage"]:.0%} (projection, initial distances, greedy '
              f'loop, selected rows) took {memory["subsample_seconds"]:.1f} s; peak RSS '
              f'{memory["peak_rss_bytes"] / 2**30:.2f} GiB, measured before anything else ran: '
              f'RSS before the bank {memory["rss_before_bank_bytes"] / 2**30:.2f} GiB + host bank '
              f'{memory["bank_bytes"] / 2**30:.2f} GiB + projection '
              f'{memory["projection_bytes"] / 2**30:.3f} GiB.']
  return '\n'.join(lines) + '\n'
