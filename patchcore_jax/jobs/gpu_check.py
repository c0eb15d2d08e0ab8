"""The GPU check (job 'gpu_check'): the accelerator paths proved and timed on a device, in minutes.

  python launch.py --config=configs/gpu_check.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/gpu_check

It refuses to start unless JAX's default backend is a GPU (`allow_cpu` runs it on the CPU: CI
does, and the CPU reference it compares with was made so). Each step adds its section to
gpu_check.json as soon as it ends (a check cut short keeps what it measured):

  environment  backend, devices, versions (jax.print_environment_info)
  data         a copy of the category pre-resized to data.resize px (decoding then costs what
               the network input does), and the time to decode one image from it
  model        PatchCore fitted and scored on the copy (config.backbone, coreset.percentage):
               metrics, scores, fit and predict time split into decode wait, features and
               search; compared with the stored CPU reference (metrics and every image's score)
  backbone     the embedding (backbone and patch features) per image at each check.batch_sizes,
               float32 and bfloat16, with compile times; the convolutions' alternative
               implementation ('tuned' on an accelerator, 'xla' on the CPU) beside the default
  pipeline     the test images scored with decoding, the copies to the device two batches
               ahead (the accelerators' pipeline) and not
  transfer     the host-to-device copy of one batch
  coreset      ms per greedy pick, lazy and full (the same picks, checked), against the time the
               full pass's read of the projection takes at the device's measured bandwidth
  knn          the search of one batch of test features: the backend's choice ('auto' block
               size and screen) and the alternative (the same neighbours, checked), against the
               same-shape float32 matmul
  memory       the device's peak memory (where the backend reports it), the process's peak RSS

gpu_check.md renders the same as a short report. The verdict `ok` is false when a comparison or
a same-result check failed; `problems` says which.
"""
import dataclasses
import functools
import json
import os
import platform
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
from patchcore_jax import evaluation
from patchcore_jax import files
from patchcore_jax import knn
from patchcore_jax import memory_bank
from patchcore_jax import patchcore
from patchcore_jax import stages
from patchcore_jax import timing
from patchcore_jax import data as data_lib
from patchcore_jax.backbones import layers
from patchcore_jax.data import common as data_common
from patchcore_jax.data import transforms
from patchcore_jax.jobs import config as config_lib
from patchcore_jax.jobs import workdir as workdir_lib

OUTPUTS = ('config.json', 'gpu_check.json', 'gpu_check.md', 'data')
GPU_BACKENDS = ('gpu', 'cuda', 'rocm')
# Agreement with the CPU reference: metrics within METRIC_TOLERANCE (absolute), every image score
# within SCORE_TOLERANCE (relative). Float32 on both, so the features agree to rounding; a
# coreset pick may still flip on a near-tie, moving a few scores by a little.
METRIC_TOLERANCE = 0.005
SCORE_TOLERANCE = 0.02


def check_backend(allow_cpu):
  """Raises errors.UserError naming the backend and devices unless it is a GPU (or allow_cpu)."""
  backend = jax.default_backend()
  if backend in GPU_BACKENDS or allow_cpu:
    return backend
  devices = ', '.join(f'{d.platform}:{d.device_kind}' for d in jax.devices())
  raise errors.UserError(
      f"the GPU check needs a GPU, but JAX's backend is {backend!r} (devices: {devices}; jax "
      f'{jax.__version__}). Install the CUDA build (pip install ".[cuda12]" or ".[cuda13]") and '
      'check that jax.devices() lists the GPU, or pass --config.allow_cpu=True to run the check '
      'on the CPU')


def environment():
  """The backend, devices and versions."""
  info = jax.print_environment_info(return_string=True)
  return {
      'backend': jax.default_backend(),
      'devices': [f'{d.platform}:{d.device_kind}' for d in jax.devices()],
      'jax': jax.__version__,
      'python': platform.python_version(),
      'machine': timing.machine_description(),
      'environment_info': info,
  }


# ------------------------------------------------------------------------------ Data.


def _resized_copy(path, target, *, resize, mask=False):
  """Writes `path` resized (shorter side to `resize`, bilinear, as the transform) to `target`."""
  with transforms.open_image(path) as img:
    img = transforms._decoded(img, path, 'L' if mask else 'RGB')  # pylint: disable=protected-access
    width, height = img.size
    new_w, new_h, _, _ = transforms.crop_box(width, height, resize=resize, image_size=resize)
    img = img.resize((new_w, new_h), Image.BILINEAR)
  os.makedirs(os.path.dirname(target), exist_ok=True)
  img.save(target, format='PNG')


def resized_split(split, folder, *, resize, max_images=0):
  """A copy of `split` under `folder`, every image and mask pre-resized to `resize` px on its
  shorter side (what `transforms.load_image` then reads is the network input itself, pixel for
  pixel). max_images > 0 keeps that many training images and that many test images spread over
  the test set (good and defective)."""
  train, test = split.train, split.test
  if max_images > 0:
    train = train[:max_images]
    test = [test[int(i)] for i in np.linspace(0, len(test) - 1, min(max_images, len(test)))]

  def copy(sample):
    target = os.path.join(folder, split.relative(sample.path))
    _resized_copy(sample.path, target, resize=resize)
    mask = None
    if sample.mask_path:
      mask = os.path.join(folder, split.relative(sample.mask_path))
      _resized_copy(sample.mask_path, mask, resize=resize, mask=True)
    return dataclasses.replace(sample, path=target, mask_path=mask, source=None)

  return data_common.Split(split.name, folder, [copy(s) for s in train], [copy(s) for s in test])


# ------------------------------------------------------------------------------ Steps.


def fit_and_score(backbone, split, settings, *, num_workers):
  """The model on `split`: metrics, scores by relative path, and the time split."""
  start = time.perf_counter()
  stages.precompile(backbone, settings)
  compile_seconds = time.perf_counter() - start
  model = patchcore.fit(backbone, [s.path for s in split.train], settings, progress=False,
                        num_workers=num_workers)
  stages.precompile(backbone, settings, model.bank)
  info = dict(model.info)
  waits = {}
  scores, maps = [], []
  begin = time.perf_counter()
  batches = data_lib.iterate_batches(split.test, batch_size=settings.batch_size,
                                     image_config=settings.image_config, with_masks=True,
                                     num_workers=num_workers)
  masks = []

  def keep_masks(batches):
    for batch in batches:
      masks.append(batch.masks[:batch.count])
      yield batch

  for out in patchcore.predict_batches(model, keep_masks(batches), timings=waits):
    scores.append(out.image_scores)
    maps.append(out.maps)
  predict_seconds = time.perf_counter() - begin
  scores, maps, masks = np.concatenate(scores), np.concatenate(maps), np.concatenate(masks)
  labels = np.array([s.label for s in split.test])
  record = evaluation.metric_record(labels, scores, masks if split.has_masks else None, maps)
  n = len(split.test)
  return model, {
      'backbone': backbone.name, 'percentage': settings.percentage,
      'num_train_images': len(split.train), 'num_test_images': n,
      'memory_bank_rows': info['memory_bank_rows'], 'memory_bank_size': model.bank.size,
      'image_auroc': record['image_auroc'], 'pixel_auroc': record['pixel_auroc'],
      'au_pro': record['au_pro'],
      'scores': {split.relative(s.path): float(v) for s, v in zip(split.test, scores)},
      'precompile_seconds': compile_seconds,
      'fit_feature_seconds': info['feature_seconds'], 'fit_coreset_seconds': info['coreset_seconds'],
      'fit_decode_wait_seconds': info['decode_wait_seconds'],
      'predict_seconds': predict_seconds,
      'predict_ms_per_image': {
          'decode_wait': 1000 * waits.get('decode_wait', 0.0) / n,
          'features': 1000 * waits.get('features', 0.0) / n,
          'search_and_maps': 1000 * waits.get('knn_maps', 0.0) / n,
          'total': 1000 * predict_seconds / n},
  }


def compare(result, reference):
  """Problems (a list of strings) between a model section and the reference's; [] when they
  agree within METRIC_TOLERANCE and SCORE_TOLERANCE. Also returns the largest differences."""
  problems, diffs = [], {}
  for metric in ('image_auroc', 'pixel_auroc', 'au_pro'):
    ours, theirs = result.get(metric), reference.get(metric)
    if ours is None or theirs is None:
      if (ours is None) != (theirs is None):
        problems.append(f'{metric}: {ours} here, {theirs} in the reference')
      continue
    diffs[metric] = ours - theirs
    if abs(ours - theirs) > METRIC_TOLERANCE:
      problems.append(f'{metric}: {ours:.4f} here, {theirs:.4f} in the reference (tolerance '
                      f'{METRIC_TOLERANCE})')
  ours, theirs = result.get('scores', {}), reference.get('scores', {})
  if set(ours) != set(theirs):
    problems.append(f'the test images differ: {len(set(ours) ^ set(theirs))} not in both')
  else:
    rel = np.array([abs(ours[k] - theirs[k]) / max(abs(theirs[k]), 1e-12) for k in theirs])
    diffs['score_max_rel'] = float(rel.max()) if rel.size else 0.0
    diffs['score_median_rel'] = float(np.median(rel)) if rel.size else 0.0
    bad = int(np.sum(rel > SCORE_TOLERANCE))
    if bad:
      problems.append(f'{bad} of {rel.size} image scores differ from the reference by more than '
                      f'{SCORE_TOLERANCE:.0%} (largest {rel.max():.2%})')
  return problems, diffs


def pipeline_timings(model, split, settings, *, num_workers):
  """Images per second of the test images' scoring, decoding included, with the host-to-device
  copies issued two batches ahead (the accelerators' pipeline) and without."""
  out = {}
  for ahead in (2, 0):
    start = time.perf_counter()
    batches = data_lib.iterate_batches(split.test, batch_size=settings.batch_size,
                                       image_config=settings.image_config,
                                       num_workers=num_workers)
    for batch in data_lib.to_device(batches, ahead=ahead):
      patchcore.predict_batch(model, batch)
    out[f'images_per_second_ahead_{ahead}'] = len(split.test) / (time.perf_counter() - start)
  out['default_ahead'] = data_common.default_device_prefetch()
  return out


def _embed_timing(backbone, settings, batch, repeats):
  """(compile seconds, median ms per image) of the embedding of `batch` images."""
  fn = functools.partial(stages.embed, **dict(stages._embed_static(backbone, settings)))  # pylint: disable=protected-access
  images = jax.device_put(np.random.default_rng(0).random(
      (batch, settings.image_size, settings.image_size, 3), dtype=np.float32))
  compiled, seconds = timing.compile_fn(fn, (backbone.variables, images))
  times = timing.call_times(compiled, (backbone.variables, images), repeats=repeats, per=batch)
  return seconds, 1000 * float(np.median(times))


def backbone_timings(backbone, settings, *, batch_sizes, repeats):
  """The embedding per image: every batch size x dtype with the backend's convolutions, and the
  alternative convolutions at the first batch size in float32."""
  default = layers.resolve_conv('auto')
  other = 'tuned' if default == 'xla' else 'xla'
  rows = []
  runs = [(b, dtype, 'auto') for b in batch_sizes for dtype in backbones.DTYPES]
  runs.append((batch_sizes[0], 'float32', other))
  for batch, dtype, conv in runs:
    variant = backbones.with_dtype(backbones.with_conv(backbone, conv), dtype)
    compile_seconds, ms = _embed_timing(variant, settings, batch, repeats)
    rows.append({'batch_size': batch, 'dtype': dtype,
                 'conv': default if conv == 'auto' else conv, 'compile_seconds': compile_seconds,
                 'ms_per_image': ms})
    logging.info('embedding, batch %d, %s, %s convolutions: %.2f ms per image (compiled in '
                 '%.1f s)', batch, dtype, rows[-1]['conv'], ms, compile_seconds)
  return rows


def transfer_timing(settings, repeats):
  """Milliseconds to copy one batch of float32 images to the device (and wait for it)."""
  images = np.random.default_rng(0).random(
      (settings.batch_size, settings.image_size, settings.image_size, 3), dtype=np.float32)
  times = timing.call_times(jax.device_put, (images,), repeats=repeats)
  return {'batch_size': settings.batch_size, 'megabytes': images.nbytes / 1e6,
          'ms_per_batch': 1000 * float(np.median(times))}


def bandwidth(megabytes=256, repeats=5):
  """The device's memory bandwidth (bytes/s): a read and a write of a float32 array."""
  x = jnp.ones((megabytes * 2**20 // 4,), jnp.float32)
  fn = jax.jit(lambda v: v * 2.0)
  times = timing.call_times(fn, (x,), repeats=repeats)
  return 2 * x.nbytes / float(np.median(times))


def coreset_timings(bank_features, settings, *, picks, repeats, key):
  """ms per greedy pick, lazy and full, on the projection of `bank_features` [N, D] (the same
  picks required), against the full pass's read of the projection at the measured bandwidth."""
  n = bank_features.shape[0]
  picks = min(picks, n - 1)
  proj_key, start_key = jax.random.split(key)
  matrix = coreset.random_projection(proj_key, bank_features.shape[1], settings.projection_dim)
  projected_t = coreset.project(bank_features, matrix, pad_to=coreset.BLOCK_SIZE)
  init = coreset.initial_distances(projected_t, start_key, num_starts=settings.num_starts,
                                   num_points=n)
  out, per_pick, first = {}, {}, {}
  for method in ('lazy', 'full'):
    fn = functools.partial(coreset.greedy_coreset_loop, projected_t, init, num_samples=picks,
                           method=method)
    start = time.perf_counter()
    out[method] = np.asarray(fn())
    first[method] = time.perf_counter() - start
    times = timing.call_times(fn, (), repeats=repeats)
    per_pick[method] = 1000 * float(np.median(times)) / picks
    logging.info('coreset, %s: %.3f ms per pick (first call, with compilation: %.1f s)', method,
                 per_pick[method], first[method])
  bw = bandwidth()
  return {
      'rows': n, 'projection_dim': settings.projection_dim, 'picks': picks,
      'ms_per_pick': per_pick, 'first_call_seconds': first,
      'method_auto': coreset.resolve_method('auto'),
      'same_picks': bool(np.array_equal(out['lazy'], out['full'])),
      'bandwidth_gb_per_s': bw / 1e9,
      'full_pass_read_ms_at_bandwidth': 1000 * settings.projection_dim * n * 4 / bw,
  }


def knn_timings(bank_rows, queries, settings, *, repeats):
  """The search of queries [B, P, D] in bank_rows [M, D]: the backend's choices ('auto') and the
  alternative (the other block size and screen; the same neighbours required), against the
  float32 matmul of the same shape."""
  auto_block = knn.resolve_block_size('auto')
  auto_screen = knn.resolve_screen('auto')
  other_block = knn.BLOCK_SIZES['cpu'] if auto_block != knn.BLOCK_SIZES['cpu'] else \
      knn.ACCELERATOR_BLOCK_SIZE
  rows, indices = [], {}
  for name, block, screen in (('auto', auto_block, auto_screen),
                              ('alternative', other_block, not auto_screen)):
    bank = knn.prepare_bank(bank_rows, block_size=block, screen=screen)
    fn = functools.partial(knn.batch_nearest_neighbours, k=settings.k,
                           precision=settings.precision)
    compiled, seconds = timing.compile_fn(fn, (queries, bank))
    times = timing.call_times(compiled, (queries, bank), repeats=repeats)
    indices[name] = np.asarray(compiled(queries, bank)[1])
    rows.append({'choice': name, 'block_size': block, 'screen': bool(knn.uses_screen(bank)),
                 'compile_seconds': seconds,
                 'ms_per_image': 1000 * float(np.median(times)) / queries.shape[0]})
  flat = queries.reshape(-1, queries.shape[-1])
  bank_t = jnp.asarray(bank_rows).T
  matmul = jax.jit(lambda a, b: jnp.dot(a, b, precision=lax.Precision.HIGHEST))
  times = timing.call_times(matmul, (flat, bank_t), repeats=repeats)
  same = bool(np.array_equal(indices['auto'], indices['alternative']))
  agree = float(np.mean(indices['auto'] == indices['alternative']))
  return {'bank_rows': int(bank_rows.shape[0]), 'queries': int(flat.shape[0]),
          'images': int(queries.shape[0]), 'choices': rows,
          'matmul_ms_per_image': 1000 * float(np.median(times)) / queries.shape[0],
          'same_neighbours': same, 'share_of_same_neighbours': agree}


def memory():
  """The device's peak bytes in use (where reported) and the process's peak RSS."""
  stats = {}
  try:
    stats = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    pass
  return {'device_peak_bytes': stats.get('peak_bytes_in_use'),
          'device_bytes_limit': stats.get('bytes_limit'),
          'peak_rss_bytes': timing.peak_rss_bytes()}


# ------------------------------------------------------------------------------ The job.


def markdown(report):
  """gpu_check.md: the report's numbers as short tables."""
  env = report.get('environment', {})
  lines = [f'# GPU check: {"ok" if report.get("ok") else "PROBLEMS"}', '',
           f'Backend {env.get("backend")}, devices {", ".join(env.get("devices", []))}, jax '
           f'{env.get("jax")}; {env.get("machine", "")}.', '']
  for problem in report.get('problems', []):
    lines.append(f'- problem: {problem}')
  m = report.get('model')
  if m:
    ref = report.get('reference', {})
    lines += ['', f'## {m["backbone"]}, {m["percentage"]:.0%} coreset, {m["num_train_images"]} '
              f'training and {m["num_test_images"]} test images', '',
              '| | image AUROC | pixel AUROC | AU-PRO |', '|---|---|---|---|']
    fmt = lambda v: '-' if v is None else f'{v:.4f}'
    lines.append(f'| here | {fmt(m["image_auroc"])} | {fmt(m["pixel_auroc"])} | '
                 f'{fmt(m["au_pro"])} |')
    if ref.get('model'):
      r = ref['model']
      lines.append(f'| CPU reference | {fmt(r["image_auroc"])} | {fmt(r["pixel_auroc"])} | '
                   f'{fmt(r["au_pro"])} |')
    lines += ['', f'Reference: {ref.get("status", "none")}' + (
        f'; scores: largest relative difference {ref["differences"]["score_max_rel"]:.2e}, '
        f'median {ref["differences"]["score_median_rel"]:.2e}'
        if 'score_max_rel' in ref.get('differences', {}) else '') + '.']
    p = m['predict_ms_per_image']
    lines += ['', f'Fit: features {m["fit_feature_seconds"]:.1f} s (decode wait '
              f'{m["fit_decode_wait_seconds"]:.1f} s), coreset {m["fit_coreset_seconds"]:.1f} s. '
              f'Predict per image: {p["total"]:.2f} ms = decode wait {p["decode_wait"]:.2f} + '
              f'features {p["features"]:.2f} + search and maps {p["search_and_maps"]:.2f} ms.']
  if report.get('pipeline'):
    q = report['pipeline']
    lines += ['', f'Scoring with decoding: {q["images_per_second_ahead_2"]:.1f} images/s with the '
              f'copies to the device two batches ahead, {q["images_per_second_ahead_0"]:.1f} '
              f'without (this backend\'s default: {q["default_ahead"]} ahead).']
  if report.get('backbone'):
    lines += ['', '## Embedding (backbone and patch features)', '',
              '| batch | dtype | convolutions | ms per image | compile s |', '|---|---|---|---|---|']
    lines += [f'| {r["batch_size"]} | {r["dtype"]} | {r["conv"]} | {r["ms_per_image"]:.2f} | '
              f'{r["compile_seconds"]:.1f} |' for r in report['backbone']]
  if report.get('transfer'):
    t = report['transfer']
    lines += ['', f'Host to device: {t["megabytes"]:.1f} MB (batch {t["batch_size"]}) in '
              f'{t["ms_per_batch"]:.2f} ms.']
  c = report.get('coreset')
  if c:
    lines += ['', f'## Coreset: {c["rows"]:,} rows, {c["picks"]} picks', '',
              f'lazy {c["ms_per_pick"]["lazy"]:.3f} ms per pick, full {c["ms_per_pick"]["full"]:.3f}'
              f' (auto: {c["method_auto"]}; same picks: {c["same_picks"]}); the full pass reads '
              f'the projection in {c["full_pass_read_ms_at_bandwidth"]:.3f} ms at the measured '
              f'{c["bandwidth_gb_per_s"]:.1f} GB/s.']
  k = report.get('knn')
  if k:
    lines += ['', f'## Search: {k["images"]} images ({k["queries"]:,} patches) against '
              f'{k["bank_rows"]:,} rows', '', '| choice | block | screen | ms per image | compile s |',
              '|---|---|---|---|---|']
    lines += [f'| {r["choice"]} | {r["block_size"]} | {r["screen"]} | {r["ms_per_image"]:.2f} | '
              f'{r["compile_seconds"]:.1f} |' for r in k['choices']]
    lines += ['', f'The same-shape float32 matmul: {k["matmul_ms_per_image"]:.2f} ms per image. '
              f'Same neighbours: {k["same_neighbours"]} ({k["share_of_same_neighbours"]:.4%}).']
  mem = report.get('memory')
  if mem:
    device = mem['device_peak_bytes']
    lines += ['', 'Peak memory: device ' + (f'{device / 2**30:.2f} GiB' if device else
                                            'not reported by this backend') +
              f', process RSS {mem["peak_rss_bytes"] / 2**30:.2f} GiB.']
  lines.append(f'\nWall clock: {report.get("wall_seconds", 0):.1f} s.')
  return '\n'.join(lines) + '\n'


def read_reference(path):
  """The stored reference report (a gpu_check.json), or None when `path` is empty or missing."""
  if not path or not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except ValueError as error:
    raise errors.UserError(f'config.check.reference={path!r}: not a gpu_check.json ({error})')


def run(config, workdir):
  """Runs the check; writes gpu_check.json (section by section) and gpu_check.md."""
  check_backend(config.allow_cpu)
  experiment = config_lib.read_experiment(config, workdir)
  cc = config.check
  if not cc.batch_sizes or any(b < 1 for b in cc.batch_sizes):
    raise errors.UserError(f'config.check.batch_sizes={tuple(cc.batch_sizes)!r}: must be '
                           'positive batch sizes')
  for field in ('repeats', 'coreset_picks'):
    if cc[field] < 1:
      raise errors.UserError(f'config.check.{field}={cc[field]!r}: must be >= 1')
  reference = read_reference(cc.reference)
  if cc.reference and reference is None:
    raise errors.UserError(f'config.check.reference={cc.reference!r}: no such file')
  splits = data_lib.get_splits(experiment.data, {})
  if len(splits) != 1:
    raise errors.UserError(f'config.data.categories={tuple(config.data.categories)!r}: the check '
                           'runs on one category')
  (name, split), = splits.items()
  settings = experiment.settings
  options = experiment.options
  start = time.perf_counter()
  report = {'ok': True, 'problems': []}
  path = os.path.join(workdir, 'gpu_check.json')

  def save(section, value):
    report[section] = value
    report['wall_seconds'] = time.perf_counter() - start
    files.write_json(path, report)

  def problem(text):
    report['problems'].append(text)
    report['ok'] = False
    logging.warning('problem: %s', text)

  with workdir_lib.running(workdir, job='gpu_check', outputs=OUTPUTS,
                          overwrite=options.overwrite):
    files.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
    save('environment', environment())
    logging.info('backend %s, devices %s', report['environment']['backend'],
                 report['environment']['devices'])
    begin = time.perf_counter()
    copy = resized_split(split, os.path.join(workdir, 'data'), resize=settings.resize,
                         max_images=cc.max_images)
    copy_seconds = time.perf_counter() - begin
    decode = timing.call_times(
        lambda: transforms.load_image(copy.test[0].path, **settings.image_config), (),
        repeats=cc.repeats)
    save('data', {'category': name, 'resize': settings.resize, 'copy_seconds': copy_seconds,
                  'num_train_images': len(copy.train), 'num_test_images': len(copy.test),
                  'decode_ms_per_image': 1000 * float(np.median(decode)),
                  'decode_workers': data_common.decode_workers(options.num_workers)})

    backbone = config_lib.load_backbone(experiment.backbone, image_size=settings.image_size)
    model, result = fit_and_score(backbone, copy, settings, num_workers=options.num_workers)
    save('model', result)
    logging.info('%s: image AUROC %.4f, pixel AUROC %s, AU-PRO %s', name, result['image_auroc'],
                 result['pixel_auroc'], result['au_pro'])
    if reference is None:
      save('reference', {'status': 'none given'})
    elif cc.max_images > 0:
      save('reference', {'status': f'not compared (check.max_images={cc.max_images}: a subset)'})
    else:
      problems, diffs = compare(result, reference.get('model', {}))
      ref_env = reference.get('environment', {})
      save('reference', {
          'status': f'compared with {cc.reference} ({ref_env.get("backend")}, '
                    f'{ref_env.get("machine", "")})',
          'model': {k: reference['model'].get(k) for k in ('image_auroc', 'pixel_auroc',
                                                            'au_pro')},
          'differences': diffs, 'agrees': not problems})
      for text in problems:
        problem(f'reference: {text}')

    save('pipeline', pipeline_timings(model, copy, settings, num_workers=options.num_workers))
    save('backbone', backbone_timings(backbone, settings, batch_sizes=tuple(cc.batch_sizes),
                                      repeats=cc.repeats))
    save('transfer', transfer_timing(settings, cc.repeats))

    bank_features = memory_bank.build_memory_bank(
        lambda x: stages.embed_batch(backbone, x, settings),
        data_lib.to_device(data_lib.iterate_batches(
            copy.train, batch_size=settings.batch_size, image_config=settings.image_config,
            num_workers=options.num_workers)), num_images=len(copy.train))
    save('coreset', coreset_timings(np.asarray(bank_features), settings,
                                    picks=cc.coreset_picks, repeats=cc.repeats,
                                    key=jax.random.key(config.seed)))
    if not report['coreset']['same_picks']:
      problem('coreset: the lazy and full greedy loops picked different points')
    del bank_features

    batch = next(data_lib.iterate_batches(copy.test, batch_size=settings.batch_size,
                                          image_config=settings.image_config,
                                          num_workers=options.num_workers))
    feats = stages.embed_batch(backbone, batch.images, settings)
    queries = feats.reshape(feats.shape[0], -1, feats.shape[-1])
    bank_rows = np.asarray(model.bank.blocks).reshape(-1, queries.shape[-1])[:model.bank.size]
    save('knn', knn_timings(bank_rows, queries, settings, repeats=cc.repeats))
    if not report['knn']['same_neighbours']:
      problem(f'knn: the backend\'s choice and the alternative found different neighbours '
              f'({report["knn"]["share_of_same_neighbours"]:.4%} the same)')
    save('memory', memory())
    files.write_text(os.path.join(workdir, 'gpu_check.md'), markdown(report))
  logging.info('\n%s', markdown(report))
  return report
