"""Benchmark mode: every PatchCore stage under jit and eagerly, against this machine's limits.

  python launch.py --config=configs/benchmark.py:backbone=wide_resnet50_2 --workdir=DIR

Random weights and generated inputs, so it runs anywhere. Every stage is timed through the
library's public functions with the harness in `patchcore_jax.timing`: compile time apart from
the steady state of the compiled function (after a warm-up; every call waited for), and the same
stage under `jax.disable_jit()` ('eager'). In the same process it measures the machine's limits
for the same work (a plain `jnp.dot` of the kNN's and the projection's shapes; the fastest of
three ways to read the projected bank once, the bytes a plain greedy iteration reads) and
what users would otherwise run: faiss-cpu `IndexFlatL2` for the kNN (optional), the official
code's greedy-coreset iteration in torch (optional) and a plain numpy loop, torchvision eager
for ResNet backbones (optional), and the literal unfold-and-pool patch embedding.

Stages: 'decode' (the host path the pipeline runs: PNG files of the raw size decoded, resized
and cropped with PIL, alone and in the pipeline's worker threads), 'backbone', 'embed',
'memory_bank', 'anomaly_maps', 'bank' (projection, coreset and kNN over generated banks; with
`knn.model` also over a saved model's bank and the features of `knn.images`), 'end_to_end' (with
`end_to_end.data.root`: the whole experiment run as the launcher runs it, and where its wall
clock went), 'scale' (not run by default: the greedy coreset and a kNN on generated banks of
`scale.rows` rows, made and projected block by block, on every device JAX sees).

Outputs in DIR: `benchmark.json` (a list of `timing.Record`), `benchmark.md` (the table with the
machine and command), `config.json`, and for 'scale' `scale.json` (rows, picks, seconds per pick,
read bound, peak RSS per size; `plot_scale` draws them).
"""
import dataclasses
import functools
import glob
import os
import tempfile
import time

from absl import logging
import jax
import jax.numpy as jnp
from jax import lax
import numpy as np
from PIL import Image

from patchcore_jax import backbones
from patchcore_jax import coreset
from patchcore_jax import errors
from patchcore_jax import features as features_lib
from patchcore_jax import files
from patchcore_jax import knn
from patchcore_jax import memory_bank
from patchcore_jax import saving
from patchcore_jax import scoring
from patchcore_jax import sharded
from patchcore_jax import stages
from patchcore_jax import timing
from patchcore_jax.data import common as data_common
from patchcore_jax.data import transforms
from patchcore_jax.jobs import charts

PARTS = ('decode', 'backbone', 'embed', 'memory_bank', 'anomaly_maps', 'bank', 'end_to_end',
         'scale')


def read_seconds(x, *, repeats):
  """(kernel name, median seconds) of the fastest of three kernels that read all of x once."""
  kernels = {
      'sum': jnp.sum,
      'max': jnp.max,
      'ones-matvec': lambda a: jnp.dot(jnp.ones((a.shape[0],), a.dtype), a,
                                       precision=lax.Precision.HIGHEST),
  }
  best = None
  for name, kernel in kernels.items():
    compiled, _ = timing.compile_fn(kernel, (x,))
    median = float(np.median(timing.call_times(compiled, (x,), repeats=repeats)))
    if best is None or median < best[1]:
      best = (name, median)
  return best


def dot_seconds(a, b, *, repeats):
  """Median seconds of a plain `a @ b.T` (float32, 'highest') with the arguments on the device."""
  compiled, _ = timing.compile_fn(
      lambda x, y: jnp.dot(x, y.T, precision=lax.Precision.HIGHEST), (a, b))
  return float(np.median(timing.call_times(compiled, (a, b), repeats=repeats)))


def numpy_greedy(points, norms, min_dist, *, iterations):
  """The plain greedy loop in numpy on points [N, d]: what a user would write; returns indices."""
  selected = []
  for _ in range(iterations):
    i = int(np.argmax(min_dist))
    selected.append(i)
    dist = np.maximum(norms - 2.0 * np.matmul(points, points[i]) + norms[i], 0.0)
    min_dist = np.minimum(min_dist, dist)
  return selected


def official_greedy(points, init_dist, *, iterations):
  """The official `ApproximateGreedyCoresetSampler` loop in torch eager, on points [N, d]: per
  iteration the argmax, the selected point's distances to every point through batched dot
  products (norms recomputed each time, as there), and a minimum over [N, 2]. Returns indices."""
  import torch  # pylint: disable=g-import-not-at-top
  x = torch.from_numpy(np.ascontiguousarray(points))
  dist = torch.from_numpy(np.sqrt(np.asarray(init_dist, np.float32))).reshape(-1, 1)
  selected = []
  with torch.no_grad():
    for _ in range(iterations):
      i = int(torch.argmax(dist).item())
      selected.append(i)
      pick = x[i:i + 1]
      xx = x.unsqueeze(1).bmm(x.unsqueeze(2)).reshape(-1, 1)
      pp = pick.unsqueeze(1).bmm(pick.unsqueeze(2)).reshape(1, -1)
      new = (-2 * x.mm(pick.T) + xx + pp).clamp(0, None).sqrt()
      dist = torch.min(torch.cat([dist, new], dim=-1), dim=1).values.reshape(-1, 1)
  return selected


def generated_pngs(directory, *, count, size, seed):
  """`count` smooth RGB PNG files of size x size (gradients, blobs and mild noise, which compress
  and decode like photographs rather than like white noise). Returns their paths."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / size
  paths = []
  for i in range(count):
    channels = []
    for _ in range(3):
      cx, cy, r = rng.random(3)
      blob = np.exp(-((xx - cx) ** 2 + (yy - cy) ** 2) / (0.02 + 0.1 * r))
      channels.append(0.4 * blob + 0.3 * xx * rng.random() + 0.3 * yy * rng.random())
    image = np.stack(channels, -1) * 230 + rng.normal(0, 3, (size, size, 3))
    path = os.path.join(directory, f'{i:03d}.png')
    Image.fromarray(np.clip(image, 0, 255).astype(np.uint8)).save(path)
    paths.append(path)
  return paths


def bench_decode(config):
  """The host image path: PIL decode, resize, crop of PNG files, alone and in worker threads."""
  t = config.timing
  image_config = dict(resize=config.resize, image_size=config.image_size,
                      transform='resize_crop')
  with tempfile.TemporaryDirectory() as directory:
    paths = generated_pngs(directory, count=2 * config.batch_size, size=config.raw_size,
                           seed=config.seed)
    size = (f'{config.raw_size}px PNG -> {config.image_size}px (resize {config.resize}, crop), '
            f'per image')
    load_all = lambda: [transforms.load_image(p, **image_config) for p in paths]
    workers = config.decode_workers
    threads = lambda: list(data_common.iterate_batches(
        paths, batch_size=config.batch_size, image_config=image_config, num_workers=workers))
    return [
        timing.time_host('decode', 'host', size, load_all, repeats=t.eager_repeats,
                         per=len(paths), note='data.transforms.load_image, one thread'),
        timing.time_host('decode', f'{workers} threads', size, threads, repeats=t.eager_repeats,
                         per=len(paths), note=f'data.iterate_batches with {workers} workers, '
                         'as fit and predict read files'),
    ]


def bench_embed(config, stage_maps):
  """Patch features from stage outputs: ours (jit, eager) and the literal unfold-and-pool."""
  t = config.timing
  b = config.batch_size
  kwargs = dict(patch_size=config.features.patch_size, pretrain_dim=config.features.pretrain_dim,
                target_dim=config.features.target_dim)
  fast = functools.partial(features_lib.patch_features, **kwargs)
  literal = functools.partial(features_lib.unfold_patch_features, **kwargs)
  shapes = ' + '.join('x'.join(map(str, m.shape[1:])) for m in stage_maps)
  size = f'{shapes} -> {config.features.target_dim}, per image (batch {b})'
  difference = float(jnp.max(jnp.abs(jax.jit(fast)(stage_maps) - jax.jit(literal)(stage_maps))))
  unfold = timing.time_jit('embed', size, literal, (stage_maps,), repeats=t.repeats, per=b,
                           note='features.unfold_patch_features (unfold every neighbourhood, '
                           'pool), jitted')
  return [
      timing.time_jit('embed', size, fast, (stage_maps,), repeats=t.repeats, per=b,
                      note=f'features.patch_features (box sums); max |difference| to the '
                      f'unfolding {difference:.2g}'),
      timing.time_eager('embed', size, fast, (stage_maps,), repeats=t.eager_repeats, per=b),
      dataclasses.replace(unfold, mode='unfold'),
  ]


def bench_backbone(config):
  """Backbone, patch embedding, memory-bank build and anomaly maps on generated images."""
  t = config.timing
  b, s = config.batch_size, config.image_size
  rng = np.random.default_rng(config.seed)
  parts = set(config.parts)
  records = []
  backbone = backbones.load_backbone(config.backbone.name, stages=config.backbone.stages,
                                     random_seed=config.seed, fold=config.backbone.fold_batchnorm)
  images = features_lib.normalize(jnp.asarray(rng.random((b, s, s, 3), dtype=np.float32)))
  size = f'{s}px to {"+".join(backbone.stages)}, per image (batch {b})'
  if 'backbone' in parts:
    records.append(timing.time_jit('backbone', size, backbone.model.apply,
                                   (backbone.variables, images), repeats=t.repeats, per=b))
    records.append(timing.time_eager('backbone', size, backbone.model.apply,
                                     (backbone.variables, images), repeats=t.eager_repeats,
                                     per=b))
    if config.compare.torch:
      records.extend(bench_torch_backbone(config, backbone, per=b))

  maps = jax.jit(backbone.apply)(images)
  stage_maps = [maps[name] for name in backbone.stages]
  if 'embed' in parts:
    records.extend(bench_embed(config, stage_maps))

  # Memory bank: images -> backbone -> embedding -> host bank, as at fit time.
  if 'memory_bank' in parts:
    embed_fn = features_lib.make_embed_fn(backbone, patch_size=config.features.patch_size,
                                          pretrain_dim=config.features.pretrain_dim,
                                          target_dim=config.features.target_dim)
    num = config.memory_bank_images
    unit = rng.random((b, s, s, 3), dtype=np.float32)
    batches = [data_common.Batch(unit, min(b, num - i)) for i in range(0, num, b)]
    _, compile_seconds = timing.compile_fn(embed_fn, (unit,))
    build = lambda: memory_bank.build_memory_bank(embed_fn, batches, num_images=num)
    size = f'{num} images of {s}px, per image'
    record = timing.time_host('memory_bank', 'jit', size, build, repeats=t.repeats, per=num,
                              note='backbone + embedding + copy into the host bank')
    records.append(dataclasses.replace(record, compile_seconds=compile_seconds))
    with jax.disable_jit():
      count = batches[0].count
      records.append(timing.time_host(
          'memory_bank', 'eager', size,
          lambda: memory_bank.build_memory_bank(embed_fn, batches[:1], num_images=count),
          repeats=t.eager_repeats, per=count, note=f'{count} images timed'))

  grid = stage_maps[0].shape[1:3]
  grid_scores = jax.device_put(rng.random((b,) + grid, dtype=np.float32))
  fn = functools.partial(scoring.anomaly_maps, size=(s, s), sigma=4.0)
  size = f'{grid[0]}x{grid[1]} -> {s}x{s}, sigma 4, per image (batch {b})'
  if 'anomaly_maps' in parts:
    records.append(timing.time_jit('anomaly_maps', size, fn, (grid_scores,), repeats=t.repeats,
                                   per=b))
    records.append(timing.time_eager('anomaly_maps', size, fn, (grid_scores,),
                                     repeats=t.eager_repeats, per=b))
  return records


def structured_bank(rows, dim, *, seed, rank=64, clusters=2048, spread=0.3, noise=0.05,
                    stream=0):
  """A generated host bank [rows, dim] (64-byte aligned, as `memory_bank.empty_host_bank`) shaped
  like CNN patch features: rows gather around `clusters` centres (repeated textures), and the
  variance lies mostly in `rank` directions (MVTec bottle banks: 99.3-99.9 % in 511). The
  centres and directions depend on `seed` only; `stream` draws other rows around the same
  centres (test patches near the training patches). Filled in blocks."""
  shape_rng = np.random.default_rng(seed)
  mix = shape_rng.standard_normal((rank, dim), dtype=np.float32) / np.sqrt(rank)
  centres = shape_rng.standard_normal((clusters, rank), dtype=np.float32)
  rng = np.random.default_rng([seed, stream])
  bank = memory_bank.empty_host_bank(rows, dim)
  for start in range(0, rows, 65536):
    stop = min(start + 65536, rows)
    z = centres[rng.integers(0, clusters, stop - start)]
    z += spread * rng.standard_normal(z.shape, dtype=np.float32)
    bank[start:stop] = np.matmul(z, mix) + noise * rng.standard_normal((stop - start, dim),
                                                              dtype=np.float32)
  return bank


class GeneratedBank:
  """A `structured_bank` of shape [rows, dim] made block by block on access, never whole in
  memory: `bank[a:b]` generates the blocks it covers (block i is the stream i + 1 of `seed`).
  `coreset.project` reads it like a host bank."""

  def __init__(self, rows, dim, *, seed, block=16384):
    self.shape = (rows, dim)
    self.seed, self.block = seed, block

  def __getitem__(self, rows):
    start, stop, _ = rows.indices(self.shape[0])
    first, last = start // self.block, (stop - 1) // self.block
    parts = [structured_bank(min(self.block, self.shape[0] - i * self.block), self.shape[1],
                             seed=self.seed, stream=i + 1) for i in range(first, last + 1)]
    offset = first * self.block
    return np.concatenate(parts)[start - offset:stop - offset]


def bench_scale(config):
  """The greedy coreset on generated banks of config.scale.rows rows x target_dim, generated and
  projected block by block (the bank is never whole in memory), over every device JAX sees
  (several: the sharded loop, `sharded.greedy_coreset_loop`). -> records."""
  records, summary = [], []
  devices = len(jax.devices())
  dim = config.features.target_dim
  for rows in config.scale.rows:
    bank = GeneratedBank(rows, dim, seed=config.seed)
    num_samples = max(1, int(rows * config.scale.percentage))
    label = f'{rows:,} x {dim} generated, {config.scale.percentage:.1%} ({num_samples:,} picks)'
    key = jax.random.key(config.seed)
    proj_key, start_key = jax.random.split(key)
    start = time.perf_counter()
    matrix = coreset.random_projection(proj_key, dim, config.bank.projection_dim)
    projected_t = coreset.project(bank, matrix, pad_to=coreset.BLOCK_SIZE * devices)
    init = coreset.initial_distances(projected_t, start_key, num_points=rows)
    jax.block_until_ready(init)
    prepare = time.perf_counter() - start
    records.append(timing.record(
        'scale_projection', 'jit', label, [prepare],
        note=f'generating the rows on the host, projecting them block by block '
             f'(coreset.project) and the initial distances; peak RSS so far '
             f'{timing.peak_rss_bytes() / 2**30:.2f} GiB'))
    _, read_limit = read_seconds(projected_t, repeats=5)
    if devices > 1:
      mesh = sharded.row_mesh(devices)
      loop = lambda: sharded.greedy_coreset_loop(projected_t, init, num_samples=num_samples,
                                                 mesh=mesh)
      mode = f'{devices} devices'
    else:
      loop = lambda: coreset.greedy_coreset_loop(projected_t, init, num_samples=num_samples)
      mode = 'jit'
    start = time.perf_counter()
    jax.block_until_ready(loop())
    first = time.perf_counter() - start
    if config.scale.repeats:
      times = timing.call_times(loop, (), repeats=config.scale.repeats, warmup=0,
                                per=num_samples)
      compile_seconds = max(first - num_samples * float(np.median(times)), 0.0)
    else:  # The first call alone (its ~1 s of compilation included).
      times, compile_seconds = [first / num_samples], None
    records.append(timing.record(
        'scale_coreset', mode, label, times, limit=read_limit, compile_seconds=compile_seconds,
        note=f'seconds per pick{"" if config.scale.repeats else " (one call, compiling in it)"}; '
             f'the whole coreset '
             f'{timing.format_seconds(num_samples * float(np.median(times)))}; limit: reading '
             f'the [{config.bank.projection_dim}, {rows:,}] projection once '
             f'({projected_t.nbytes / 2**30:.2f} GiB), a plain loop\'s cost per pick; peak RSS '
             f'so far {timing.peak_rss_bytes() / 2**30:.2f} GiB'))
    summary.append({'rows': rows, 'devices': devices, 'picks': num_samples,
                    'seconds_per_pick': float(np.median(times)), 'read_seconds': read_limit,
                    'prepare_seconds': prepare, 'peak_rss_bytes': timing.peak_rss_bytes()})
    del projected_t, init
    # kNN of one batch of images' patches against the bank's first num_samples rows (a bank of
    # the coreset's size): the scan on one device, or split over the devices.
    knn_bank = knn.prepare_bank(jnp.asarray(bank[:num_samples]), block_size=config.knn.block_size)
    queries = jnp.asarray(structured_bank(config.batch_size * config.scale.patches_per_image,
                                          dim, seed=config.seed, stream=0))
    knn_label = (f'{queries.shape[0]:,} queries x {num_samples:,}-row bank (first rows of the '
                 f'{rows:,})')
    if devices > 1:
      search = lambda q, b: sharded.nearest_neighbours(q, b, mesh=mesh)
      knn_bank, note = sharded.shard_bank(knn_bank, mesh), 'sharded.nearest_neighbours'
    else:
      search, note = lambda q, b: knn.nearest_neighbours(q, b), 'knn.nearest_neighbours'
    knn_record = timing.time_jit('scale_knn', knn_label, search, (queries, knn_bank),
                                 repeats=max(config.scale.repeats, 3), per=config.batch_size)
    records.append(dataclasses.replace(knn_record, mode=mode, note=f'{note}, per image'))
  return records, summary


def plot_scale(summaries, path, *, size=(900, 380)):
  """A PNG of peak RSS and seconds per pick (with the read bound) against bank rows, log-log,
  from the `scale.json` lists of one or more 'scale' runs."""
  points = sorted((p for s in summaries for p in s), key=lambda p: p['rows'])
  width, height = size
  image, draw = charts.canvas(size)
  panels = [('peak RSS (GiB)', [('peak RSS', [p['peak_rss_bytes'] / 2**30 for p in points])]),
            ('ms per greedy pick', [('lazy loop', [1e3 * p['seconds_per_pick'] for p in points]),
                                    ('read bound', [1e3 * p['read_seconds'] for p in points])])]
  rows = np.log10([p['rows'] for p in points])
  for k, (title, lines) in enumerate(panels):
    left, top, w, h = 60 + k * width // 2, 40, width // 2 - 100, height - 100
    values = np.log10([v for _, ys in lines for v in ys])
    lo, hi = np.floor(values.min()), np.ceil(values.max())
    hi = max(hi, lo + 1)
    xlo, xhi = np.floor(rows.min() * 2) / 2, np.ceil(rows.max() * 2) / 2
    xy = lambda x, y: (left + w * (x - xlo) / (xhi - xlo), top + h - h * (y - lo) / (hi - lo))
    charts.frame(draw, left, top, left + w, top + h)
    draw.text((left, 10), title + ' against bank rows (log-log)', fill='black')
    for e in np.arange(lo, hi + 1):
      y = xy(xlo, e)[1]
      draw.line([left - 4, y, left, y], fill='black')
      draw.text((left - 50, y - 6), f'{10 ** e:g}', fill='black')
    for x, p in zip(rows, points):
      draw.text((xy(x, lo)[0] - 20, top + h + 6), f'{p["rows"] / 1e6:.2g}M', fill='black')
    for j, (_, ys) in enumerate(lines):
      charts.series(draw, [xy(x, np.log10(y)) for x, y in zip(rows, ys)], charts.COLOURS[j])
    charts.legend(draw, left + 8, top + 8, [(name, charts.COLOURS[j])
                                           for j, (name, _) in enumerate(lines)], step=14)
  image.save(path)


def bench_bank_and_coreset(config, *, patches_per_image, dim):
  """Projection, coreset and kNN stages for every bank size; also memory. -> (records, memory)."""
  records, memory = [], {}
  for scale in config.bank.scales:
    n = config.bank.num_images * patches_per_image * scale
    label = f'{config.bank.num_images * scale} img x {patches_per_image} x {dim} ({n:,} rows)'
    rss_before = timing.rss_bytes()
    # [N, D] host memory bank, as build_memory_bank's; its first rows serve as the kNN banks.
    bank = structured_bank(n, dim, seed=config.seed + scale)
    if scale == config.bank.scales[0]:
      # The fit's memory: the library's own subsampling of the host bank (projection, initial
      # distances, greedy loop, selected rows), before any other copy is made.
      percentage = min(config.bank.percentages)
      start = time.perf_counter()
      memory_bank.subsample(bank, percentage=percentage, key=jax.random.key(config.seed),
                          projection_dim=config.bank.projection_dim)
      memory = {'bank_rows': n, 'bank_bytes': bank.nbytes, 'percentage': percentage,
                'projection_bytes': n * config.bank.projection_dim * 4,
                'rss_before_bank_bytes': rss_before, 'peak_rss_bytes': timing.peak_rss_bytes(),
                'subsample_seconds': time.perf_counter() - start}
    projection_records, projected_t = bench_projection(config, bank, label=label)
    records += projection_records
    records += bench_coreset(config, projected_t, label=label)
    del projected_t
    # kNN per image over banks of this bank's first rows; queries: new rows around its centres.
    queries = jax.device_put(structured_bank(config.batch_size * patches_per_image, dim,
                                             seed=config.seed + scale, stream=1).reshape(
                                                 config.batch_size, patches_per_image, dim))
    for percentage in config.bank.percentages:
      m = coreset.coreset_size(n, percentage)
      records.extend(bench_knn(config, bank[:m], queries, label=f'{m:,}-row bank '
                               f'({percentage:.0%} of {n:,}, generated)'))
    del bank
  return records, memory


def bench_projection(config, bank, *, label):
  """Host bank [N, D] -> device [d, N] (`coreset.project`). -> (records, the projection)."""
  t = config.timing
  n, dim = bank.shape
  matrix = coreset.random_projection(jax.random.key(config.seed), dim, config.bank.projection_dim)
  limit = dot_seconds(jax.device_put(bank), matrix.T, repeats=t.repeats)
  project = lambda: coreset.project(bank, matrix)
  start = time.perf_counter()
  jax.block_until_ready(project())
  first = time.perf_counter() - start
  record = timing.time_host('projection', 'jit', label, project, repeats=t.repeats)
  flops = 2 * n * dim * config.bank.projection_dim
  records = [dataclasses.replace(
      record, compile_seconds=max(first - record.median_seconds, 0.0), limit_seconds=limit,
      efficiency=limit / record.median_seconds,
      note=f'coreset.project, reading the host bank in blocks; compile: first call minus the '
      f'median; limit: the same dot on a device-resident bank, {flops / limit / 1e9:.0f} GFLOP/s')]
  with jax.disable_jit():
    times = timing.call_times(project, (), repeats=t.eager_repeats)
  records.append(timing.record('projection', 'eager', label, times, limit=limit))
  return records, project()


def bench_coreset(config, projected_t, *, label):
  """Greedy coreset over projected_t [d, N], seconds per iteration: jit per percentage, eager,
  numpy and the official loop once (the work per iteration does not depend on the percentage)."""
  t = config.timing
  d, n = projected_t.shape
  init = coreset.initial_distances(projected_t, jax.random.key(1))
  read_kernel, read_limit = read_seconds(projected_t, repeats=max(t.repeats, 10))
  records = [timing.record('read_bandwidth', 'limit',
                           f'[{d}, {n:,}] f32 ({projected_t.nbytes / 2**20:.0f} MiB)',
                           [read_limit], note=f'{projected_t.nbytes / read_limit / 1e9:.1f} GB/s '
                           f'({read_kernel}, fastest of sum/max/ones-matvec)')]
  sizes = []
  for percentage in config.bank.percentages:
    num_samples = coreset.coreset_size(n, percentage)
    iters = min(num_samples, t.coreset_iterations)
    loop = lambda iters=iters: coreset.greedy_coreset_loop(projected_t, init, num_samples=iters)
    start = time.perf_counter()
    jax.block_until_ready(loop())  # Compiles (the bounds are traced: one program per shape).
    first = time.perf_counter() - start
    times = timing.call_times(loop, (), repeats=t.coreset_repeats, warmup=0, per=iters)
    sizes.append(f'{label}, {percentage:.0%} ({num_samples:,} iterations)')
    timed = (f'first {iters:,} of {num_samples:,} iterations timed' if iters < num_samples
             else 'all iterations timed')
    records.append(timing.record(
        'coreset', 'jit', sizes[-1], times, compile_seconds=max(first - iters * np.median(times),
                                                                0.0), limit=read_limit,
        note=f'coreset.greedy_coreset_loop (lazy blocks; limit: one full pass over the '
             f'projection per pick, the bound of the plain loop); {timed}' +
             (f'; the whole coreset takes about '
              f'{timing.format_seconds(num_samples * np.median(times))} at this rate'
              if iters < num_samples else '')))
  # Labelled as the first percentage's jit row, so that the table compares them.
  eager_iters = t.coreset_eager_iterations
  with jax.disable_jit():
    times = timing.call_times(
        lambda: coreset.greedy_coreset_loop(projected_t, init, num_samples=eager_iters), (),
        repeats=t.eager_repeats, per=eager_iters)
  records.append(timing.record('coreset', 'eager', sizes[0], times, limit=read_limit,
                               note=f'{eager_iters} iterations of the loop under disable_jit'))
  points = np.ascontiguousarray(np.asarray(projected_t).T)  # [N, d], the natural numpy layout.
  np_norms = np.asarray(coreset.squared_norms_jit(projected_t))
  np_init = np.asarray(init)
  its = t.numpy_iterations
  records.append(timing.time_host(
      'coreset', 'numpy', sizes[0],
      lambda: numpy_greedy(points, np_norms, np_init, iterations=its), repeats=t.eager_repeats,
      warmup=0, per=its, note=f'{its} iterations of a plain numpy loop on [N, d]'))
  if config.compare.torch:
    try:
      import torch  # pylint: disable=g-import-not-at-top
    except (ImportError, RuntimeError) as e:
      logging.warning('torch not importable (%s): no official coreset row', e)
    else:
      torch.set_num_threads(os.cpu_count())
      records.append(timing.time_host(
          'coreset', 'official', sizes[0],
          lambda: official_greedy(points, np_init, iterations=its), repeats=t.eager_repeats,
          warmup=1, per=its, note=f'{its} iterations of the official sampler\'s loop, torch '
          f'{torch.__version__} eager, {torch.get_num_threads()} threads'))
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
      timing.time_jit('knn', size, fn, (queries, bank), repeats=t.repeats, per=b, limit=limit,
                      note=f'float32 scan; limit: plain float32 jnp.dot of the same shapes, '
                      f'{flops / limit / 1e9:.0f} GFLOP/s'),
      timing.time_eager('knn', size, fn, (queries, bank), repeats=t.eager_repeats, per=b,
                        limit=limit, note='float32 scan'),
  ]
  # Timed on every bank, also below knn.SCREEN_MIN_ROWS where the library keeps the scan.
  screened = knn.prepare_bank(bank_rows, block_size=config.knn.block_size, screen=True,
                              screen_min_rows=0)
  if config.knn.screen and knn.uses_screen(screened):
    want = fn(queries, bank)[1]
    got = fn(queries, screened)[1]
    same = float(jnp.mean(got == want))
    records += [
        timing.time_jit('knn_screened', size, fn, (queries, screened), repeats=t.repeats,
                        per=b, limit=limit,
                        note=f'{knn.SCREEN_DIM}-d bfloat16 screen + float32 check of '
                        f'{knn.SCREEN_CANDIDATES} rows; same index as the float32 scan for '
                        f'{same:.2%} of queries; limit: the float32 dot'
                        + ('' if m >= knn.SCREEN_MIN_ROWS else
                           f'; below {knn.SCREEN_MIN_ROWS} rows the library uses the scan')),
        timing.time_eager('knn_screened', size, fn, (queries, screened),
                          repeats=t.eager_repeats, per=b, limit=limit),
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
      records.append(timing.time_host(
          'knn', 'faiss', size, lambda: index.search(flat_queries, 1), repeats=t.repeats, per=b,
          note=f'faiss {faiss.__version__} IndexFlatL2, k=1'))
      records[-1] = dataclasses.replace(records[-1], limit_seconds=limit,
                                        efficiency=limit / records[-1].median_seconds)
  return records


def bench_saved_bank(config):
  """kNN over a saved model's memory bank with the patch features of real images."""
  model = saving.load(config.knn.model)
  paths = sorted(p for p in glob.glob(os.path.join(config.knn.images, '**', '*'), recursive=True)
                 if os.path.splitext(p)[1].lower() in ('.png', '.jpg', '.jpeg', '.bmp'))
  paths = paths[:model.settings.batch_size]
  batch = next(data_common.image_batches(paths, batch_size=model.settings.batch_size,
                                         image_config=model.settings.image_config))
  feats = stages.embed_batch(model.backbone, batch.images, model.settings)
  b, h, w, d = feats.shape
  rows = np.asarray(memory_bank.bank_rows(model.bank))
  name = os.path.basename(os.path.normpath(config.knn.model))
  return bench_knn(config, rows, feats.reshape(b, h * w, d),
                   label=f'{rows.shape[0]:,}-row bank (saved model {name!r}, '
                   f'{model.backbone.name}; queries: {len(paths)} of its images)')


def bench_end_to_end(config, workdir):
  """The experiment `config.end_to_end` run as the launcher runs it (`jobs.run`, replacing the
  outputs of an earlier benchmark's run): its wall clock and split."""
  from patchcore_jax import jobs  # pylint: disable=g-import-not-at-top
  directory = os.path.join(workdir, 'end_to_end')
  e2e = config.end_to_end.copy_and_resolve_references()
  with e2e.unlocked():
    e2e.output.overwrite = True
  stages.DEFAULT_CACHE.clear()  # Its compilations count, as in a fresh launcher process.
  start = time.perf_counter()
  results = jobs.run(e2e, directory)
  wall = time.perf_counter() - start
  records = []
  for category, result in results.items():
    size = (f'{category}, {e2e.backbone.name}, {e2e.coreset.percentage:.0%}, '
            f'{result["num_train_images"]} + {result["num_test_images"]} images')
    records.append(timing.record(
        'end_to_end', 'wall', size, [wall], note=(
            f'the experiment job as the launcher runs it: image AUROC '
            f'{result["image_auroc"]:.4f}, fit {result["fit_seconds"]:.1f} s, '
            f'{1000 * result["inference_seconds_per_image"]:.0f} ms per test image; split: '
            + ', '.join(f'{k} {v:.1f} s' for k, v in result['timings'].items()))))
    for part, seconds in result['timings'].items():
      if part != 'wall':
        records.append(timing.record(f'end_to_end:{part}', 'wall', size, [seconds]))
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
  return [timing.record('backbone', 'torch', size, times,
                  note=f'torch {torch.__version__} eager, torchvision {torchvision.__version__}, '
                       f'{torch.get_num_threads()} threads')]


def run(config, workdir):
  """Runs every benchmark of `config` and writes DIR/benchmark.{json,md}."""
  stride = backbones.build_model(config.backbone.name, config.backbone.stages)[1][
      config.backbone.stages[0]]
  patches = (config.image_size // stride) ** 2
  unknown = set(config.parts) - set(PARTS)
  if unknown:
    raise errors.UserError(f'parts (config.parts) = {sorted(unknown)} unknown; known: {PARTS}')
  for field, path in (('knn.model', config.knn.model), ('knn.images', config.knn.images)):
    if path and not os.path.isdir(path):
      raise errors.UserError(f'{field} = {path!r}: no such folder')
  if bool(config.knn.model) != bool(config.knn.images):
    raise errors.UserError('knn.model and knn.images go together: set both or neither')
  os.makedirs(workdir, exist_ok=True)
  files.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
  records, memory = [], {}
  if 'bank' in config.parts:
    # Bank and coreset first, so that the peak memory reported is theirs alone.
    records, memory = bench_bank_and_coreset(config, patches_per_image=patches,
                                             dim=config.features.target_dim)
    if config.knn.model:
      records += bench_saved_bank(config)
  if set(config.parts) & {'backbone', 'embed', 'memory_bank', 'anomaly_maps'}:
    records = bench_backbone(config) + records
  if 'decode' in config.parts:
    records = bench_decode(config) + records
  if 'end_to_end' in config.parts and config.end_to_end.data.root:
    records += bench_end_to_end(config, workdir)
  if 'scale' in config.parts:
    scale_records, summary = bench_scale(config)
    records += scale_records
    files.write_json(os.path.join(workdir, 'scale.json'), summary)
  files.write_json(os.path.join(workdir, 'benchmark.json'),
                         [dataclasses.asdict(r) for r in records])
  table = markdown(records, machine=timing.machine_description(), memory=memory, config=config)
  files.write_text(os.path.join(workdir, 'benchmark.md'), table)
  logging.info('\n%s', table)
  return records


def markdown(records, *, machine, memory, config):
  """benchmark.md: machine, command, the table (`timing.markdown`) and the fit's memory."""
  header = [
      f'Machine: {machine}.',
      f'Command: `python launch.py --config=configs/benchmark.py:backbone={config.backbone.name}'
      f'{",size=" + config.size if config.size != "full" else ""} --workdir=DIR`.',
      '',
  ]
  lines = [timing.markdown(records, header=header).rstrip('\n')]
  if memory:
    lines += ['', f'Fit memory and time: `memory_bank.subsample` of the {memory["bank_rows"]:,}-row '
              f'host bank to {memory["percentage"]:.0%} (projection, initial distances, greedy '
              f'loop, selected rows) took {memory["subsample_seconds"]:.1f} s; peak RSS '
              f'{memory["peak_rss_bytes"] / 2**30:.2f} GiB, measured before anything else ran: '
              f'RSS before the bank {memory["rss_before_bank_bytes"] / 2**30:.2f} GiB + host bank '
              f'{memory["bank_bytes"] / 2**30:.2f} GiB + projection '
              f'{memory["projection_bytes"] / 2**30:.3f} GiB.']
  return '\n'.join(lines) + '\n'
