"""Sweeps: many PatchCore variants on the same features, in one process (job 'sweep').

A percentage of 1.0 is the whole bank, the same for every subsampler: it is scored once, as
subsampler 'none'.

Feature extraction is what a run spends its time on, and every subsampler and percentage scores
the same training and test features. Per category a sweep extracts them once, then for every
variant subsamples the bank, searches it exactly and evaluates:

- 'greedy': the approximate greedy coreset, run ONCE to the largest percentage: its first n
  picks are the n-pick coreset (the loop is sequential and deterministic), so 25/10/1/0.1 % cost
  one run (`greedy_prefixes`; tests check the prefix against a run to n).
- 'random': a seeded uniform sample of the bank (the prefix of one permutation).
- 'proxies': learned basis proxies (the paper's Eq. 8, `learned_proxies`), optimised with optax
  on minibatches of the bank.

For every variant: image AUROC, pixel AUROC, AU-PRO, the F1-optimal threshold's misclassified
count, and the memory-bank usage (the share of bank rows that are the nearest neighbour of at
least one test patch; the paper: < 30 % without subsampling, ~95 % at 1 %).

Writes into `workdir` (atomically): config.json, status.json, sweep.json (a list of records
{"variant": {...}, "category", "image_auroc", "pixel_auroc", "au_pro", "memory_bank_size",
"misclassified", "memory_bank_usage", "subsample_seconds", "score_seconds"}), timings.json (what
was shared and what each variant cost), report.md (ours beside the paper's where it gives
numbers), plots/<category>_<metric>.png.
"""
import dataclasses
import functools
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
import optax
from PIL import Image
from PIL import ImageDraw

from patchcore_jax import coreset
from patchcore_jax import data as data_lib
from patchcore_jax import errors
from patchcore_jax import experiment
from patchcore_jax import knn
from patchcore_jax import metrics
from patchcore_jax import patchcore
from patchcore_jax import workdir as workdir_lib

SUBSAMPLERS = ('greedy', 'random', 'proxies')
PROXY_SIGNS = ('softmin', 'printed')
OUTPUTS = ('config.json', 'sweep.json', 'timings.json', 'report.md', 'plots')


# ------------------------------------------------------------------------------- Subsamplers.


def bank_size(rows, percentage):
  """Rows a percentage keeps (as `coreset.approximate_greedy_coreset`): all for 1.0."""
  return rows if percentage == 1.0 else int(rows * percentage)


def greedy_prefixes(bank_features, percentages, *, key, projection_dim=128, num_starts=10,
                    precision='highest'):
  """{percentage: coreset indices}: one greedy run to the largest percentage, cut to each size."""
  rows = bank_features.shape[0]
  largest = max(p for p in percentages)
  picks = np.asarray(coreset.approximate_greedy_coreset(
      bank_features, percentage=largest, key=key, projection_dim=projection_dim,
      num_starts=num_starts, precision=precision))
  return {p: picks[:bank_size(rows, p)] for p in percentages}


def random_prefixes(rows, percentages, *, seed):
  """{percentage: indices}: prefixes of one seeded permutation of the rows."""
  order = np.random.default_rng(seed).permutation(rows).astype(np.int32)
  return {p: order[:bank_size(rows, p)] for p in percentages}


def proxy_loss(proxies, batch, *, temperature=1.0, sign='softmin'):
  """Eq. 8's objective on a minibatch: every bank row m's distances to the proxies p, weighted
  by a softmax over the proxies of -||m - p|| / temperature ('softmin': the nearest proxies
  count, so each proxy is pulled to the rows it represents) or of +||m - p|| / temperature
  ('printed': the sign as Eq. 8 is printed, which weights the farthest proxies). Mean over
  rows of the weighted squared distance.

  proxies [K, D], batch [B, D] -> scalar.
  """
  sq = (jnp.sum(batch * batch, 1)[:, None] - 2.0 * jnp.dot(batch, proxies.T,
                                                           precision=jax.lax.Precision.HIGHEST)
        + jnp.sum(proxies * proxies, 1)[None, :])
  sq = jnp.maximum(sq, 0.0)
  dist = jnp.sqrt(sq + 1e-12)
  direction = -1.0 if sign == 'softmin' else 1.0
  weights = jax.nn.softmax(direction * dist / temperature, axis=1)
  return jnp.mean(jnp.sum(weights * sq, axis=1))


@functools.partial(jax.jit, static_argnames=('optimizer', 'temperature', 'sign'), donate_argnums=0)
def _proxy_step(state, batch, *, optimizer, temperature, sign):
  proxies, opt_state = state
  loss, grads = jax.value_and_grad(proxy_loss)(proxies, batch, temperature=temperature, sign=sign)
  updates, opt_state = optimizer.update(grads, opt_state, proxies)
  return (optax.apply_updates(proxies, updates), opt_state), loss


def learned_proxies(bank_features, num_proxies, *, seed=0, steps=200, batch_size=512,
                    learning_rate=1e-2, temperature=None, sign='softmin'):
  """Learned basis proxies (Eq. 8): `num_proxies` synthetic bank rows fitted to the bank.

  Initialised from distinct random bank rows (seeded by `seed`, as the minibatches); Adam
  (optax) on minibatches of `batch_size` bank rows, `steps` steps. `temperature` defaults to the median nearest-proxy distance at the start
  (the scale of the distances, so the softmax neither collapses to a hard minimum nor spreads
  evenly).
  Returns:
    (proxies [num_proxies, D] float32 numpy, losses [steps] numpy).
  """
  if sign not in PROXY_SIGNS:
    raise ValueError(f'sign must be one of {PROXY_SIGNS}, got {sign!r}')
  rows = bank_features.shape[0]
  rng = np.random.default_rng(seed)
  start = np.sort(rng.choice(rows, num_proxies, replace=False))
  proxies = jnp.asarray(np.asarray(bank_features[start], np.float32))
  if temperature is None:
    sample = jnp.asarray(np.asarray(bank_features[np.sort(rng.choice(rows, min(rows, 512),
                                                                     replace=False))]))
    nearest = jnp.sqrt(jnp.maximum(jnp.min(
        jnp.sum(sample * sample, 1)[:, None] - 2.0 * sample @ proxies.T
        + jnp.sum(proxies * proxies, 1)[None, :], axis=1), 0.0))
    temperature = float(jnp.maximum(jnp.median(nearest), 1e-3))
  optimizer = optax.adam(learning_rate)
  state = (proxies, optimizer.init(proxies))
  losses = []
  for _ in range(steps):
    batch = np.asarray(bank_features[np.sort(rng.choice(rows, min(rows, batch_size),
                                                        replace=False))], np.float32)
    state, loss = _proxy_step(state, jnp.asarray(batch), optimizer=optimizer,
                              temperature=temperature, sign=sign)
    losses.append(loss)
  return np.asarray(state[0]), np.asarray(jnp.stack(losses)) if losses else np.zeros((0,))


# ---------------------------------------------------------------------------------- Scoring.


@dataclasses.dataclass
class Features:
  """One category's features, extracted once for every variant."""
  train: np.ndarray  # [N, D] the whole memory bank.
  test: np.ndarray  # [n_test, h, w, D].
  labels: np.ndarray  # [n_test].
  masks: np.ndarray  # [n_test, S, S] bool.
  has_masks: bool
  seconds: float


def extract(backbone, split, settings, *, num_workers=2):
  """Training bank and test features of `split`, each image through the backbone once."""
  start = time.perf_counter()
  patchcore.precompile(backbone, settings)
  embed = lambda x: patchcore.embed_batch(backbone, x, settings)
  train = patchcore.build_memory_bank(
      embed, patchcore.image_batches(split.train, settings, num_workers=num_workers),
      num_images=len(split.train))
  test, masks = [], []
  for images, batch_masks, count in data_lib.iterate_batches(
      split.test, batch_size=settings.batch_size, image_config=settings.image_config,
      with_masks=True, num_workers=num_workers):
    test.append(np.asarray(embed(images))[:count])
    masks.append(batch_masks[:count])
  return Features(train=train, test=np.concatenate(test), masks=np.concatenate(masks),
                  labels=np.array([s.label for s in split.test]), has_masks=split.has_masks,
                  seconds=time.perf_counter() - start)


def evaluate(bank_rows, feats, *, settings):
  """Scores `feats` against the bank `bank_rows` [M, D] as a fitted model would
  (`patchcore.score_batch`: k, distance, Eq. 7 and sigma from `settings`); the metrics record of
  one variant."""
  start = time.perf_counter()
  bank = knn.prepare_bank(bank_rows, block_size=settings.block_size, screen=settings.screen)
  n, bs = len(feats.test), settings.batch_size
  image_scores = np.empty((n,), np.float32)
  maps = np.empty((n,) + feats.masks.shape[1:], np.float32)
  used = np.zeros((bank_rows.shape[0],), bool)
  for i in range(0, n, bs):
    chunk = feats.test[i:i + bs]
    count = len(chunk)
    if count < bs:  # One compiled shape: pad the last batch.
      chunk = np.concatenate([chunk, np.zeros((bs - count,) + chunk.shape[1:], chunk.dtype)])
    scores, batch_maps, _, nearest = patchcore.score_batch(bank, jnp.asarray(chunk), settings,
                                                           with_index=True)
    image_scores[i:i + count] = np.asarray(scores)[:count]
    maps[i:i + count] = np.asarray(batch_maps)[:count]
    used[np.asarray(nearest)[:count].ravel()] = True
  threshold, _ = metrics.f1_optimal_threshold(feats.labels, image_scores)
  record = {
      'image_auroc': metrics.image_auroc(feats.labels, image_scores),
      'pixel_auroc': metrics.pixel_auroc(feats.masks, maps) if feats.has_masks else None,
      'au_pro': metrics.au_pro(feats.masks, maps) if feats.has_masks else None,
      'memory_bank_size': int(bank_rows.shape[0]),
      'misclassified': (int(np.sum((image_scores > threshold) != feats.labels))
                        if threshold is not None else None),
      'memory_bank_usage': float(used.mean()),
      'score_seconds': time.perf_counter() - start,
  }
  return record


# ------------------------------------------------------------------------------------- Run.


def validate(config):
  """Checks the sweep fields; raises errors.UserError naming the field."""
  sc = config.sweep
  bad = [s for s in sc.subsamplers if s not in SUBSAMPLERS]
  if not sc.subsamplers or bad:
    raise errors.UserError(f'config.sweep.subsamplers={tuple(sc.subsamplers)!r} is not allowed: '
                           f'must be some of {SUBSAMPLERS}')
  if not sc.percentages or not all(0.0 < p <= 1.0 for p in sc.percentages):
    raise errors.UserError(f'config.sweep.percentages={tuple(sc.percentages)!r} is not allowed: '
                           'must be fractions in (0, 1]')
  pc = sc.proxies
  if pc.sign not in PROXY_SIGNS + ('both',):
    raise errors.UserError(f'config.sweep.proxies.sign={pc.sign!r} is not allowed: must be one '
                           f'of {PROXY_SIGNS + ("both",)}')
  for field in ('steps', 'batch_size'):
    if pc[field] < 1:
      raise errors.UserError(f'config.sweep.proxies.{field}={pc[field]!r} is not allowed: must be '
                             '>= 1')
  if pc.learning_rate <= 0:
    raise errors.UserError(f'config.sweep.proxies.learning_rate={pc.learning_rate!r} is not '
                           'allowed: must be > 0')


def variants_of(features, config, key):
  """Yields (variant dict, bank rows [M, D], seconds spent subsampling) for every variant."""
  sc = config.sweep
  rows = features.train.shape[0]
  if 1.0 in sc.percentages:  # The whole bank, the same for every subsampler: scored once.
    yield dict(subsampler='none', percentage=1.0), features.train, 0.0
  percentages = tuple(sorted(set(sc.percentages) - {1.0}, reverse=True))
  if not percentages:
    return
  for name in sc.subsamplers:
    start = time.perf_counter()
    if name == 'greedy':
      picks = greedy_prefixes(features.train, percentages, key=key, projection_dim=config.coreset.projection_dim,
                              num_starts=config.coreset.num_starts,
                              precision=config.knn.precision)
    elif name == 'random':
      picks = random_prefixes(rows, percentages, seed=config.seed)
    shared = time.perf_counter() - start  # The one greedy run (or permutation) all sizes share.
    for p in percentages:
      if name == 'proxies':
        signs = PROXY_SIGNS if sc.proxies.sign == 'both' else (sc.proxies.sign,)
        for sign in signs:
          start = time.perf_counter()
          bank, _ = learned_proxies(
              features.train, bank_size(rows, p), seed=config.seed, steps=sc.proxies.steps,
              batch_size=sc.proxies.batch_size, learning_rate=sc.proxies.learning_rate,
              sign=sign)
          yield (dict(subsampler='proxies', percentage=p, proxy_sign=sign), bank,
                 time.perf_counter() - start)
        continue
      yield dict(subsampler=name, percentage=p), features.train[picks[p]], shared
      shared = 0.0  # Counted once, with the first size.


def run(config, workdir):
  """Runs the sweep `config.sweep` describes over every category; returns the records."""
  validate(config)
  settings = experiment.validate_config(config)
  splits = data_lib.get_splits(config.data)
  for split in splits.values():
    data_lib.check_split(split)
  status = workdir_lib.claim(workdir, job='sweep', outputs=OUTPUTS,
                             overwrite=config.output.overwrite)
  try:
    workdir_lib.write_text(os.path.join(workdir, 'config.json'),
                           config.to_json_best_effort(indent=2))
    backbone = experiment.load_backbone(config)
    records, timings = [], {}
    start = time.perf_counter()
    for i, (name, split) in enumerate(splits.items()):
      key = jax.random.fold_in(jax.random.key(config.seed), i)
      features = extract(backbone, split, settings, num_workers=config.data.num_workers)
      timings[name] = {'features_seconds': features.seconds, 'variants': []}
      logging.info('[%s] features of %d training and %d test images in %.1f s', name,
                   len(split.train), len(split.test), features.seconds)
      for variant, bank, seconds in variants_of(features, config, key):
        record = evaluate(bank, features, settings=settings)
        record.update(variant=variant, category=name, subsample_seconds=seconds,
                      backbone=backbone.name)
        records.append(record)
        timings[name]['variants'].append(dict(variant=variant, subsample_seconds=seconds,
                                              score_seconds=record['score_seconds']))
        logging.info('[%s] %s: image AUROC %.4f, bank %d, usage %.3f (%.1f s + %.1f s)', name,
                     variant, record['image_auroc'], record['memory_bank_size'],
                     record['memory_bank_usage'], seconds, record['score_seconds'])
        workdir_lib.write_json(os.path.join(workdir, 'sweep.json'), records)
      timings[name]['total_seconds'] = time.perf_counter() - start
      workdir_lib.mark_done(workdir, status, name)
    timings['wall_seconds'] = time.perf_counter() - start
    workdir_lib.write_json(os.path.join(workdir, 'timings.json'), timings)
    workdir_lib.write_text(os.path.join(workdir, 'report.md'),
                           report(records, config, timings))
    for name in splits:
      for metric in ('image_auroc', 'pixel_auroc', 'memory_bank_usage'):
        image = plot([r for r in records if r['category'] == name], metric)
        if image is not None:
          workdir_lib.save_png(os.path.join(workdir, 'plots', f'{name}_{metric}.png'), image)
  except BaseException as error:
    workdir_lib.finish(workdir, status, error=error)
    raise
  workdir_lib.finish(workdir, status)
  return records


def _label(variant):
  extra = f' ({variant["proxy_sign"]})' if 'proxy_sign' in variant else ''
  return f'{variant["subsampler"]}{extra}'


def _pct(value):
  return 'n/a' if value is None else f'{100 * value:.2f}'


def report(records, config, timings):
  """report.md: one table per category, the paper's statements beside ours."""
  lines = [f'# Sweep: {config.backbone.name}, {config.data.name}', '']
  for name in dict.fromkeys(r['category'] for r in records):
    lines += [f'## {name}', '', '| subsampler | % | bank | image AUROC | pixel AUROC | AU-PRO | '
              'misclassified | bank usage | subsample s | score s |', '|---|---|---|---|---|---|---|'
              '---|---|---|']
    for r in (r for r in records if r['category'] == name):
      v = r['variant']
      lines.append(f'| {_label(v)} | {100 * v["percentage"]:g} | {r["memory_bank_size"]:,} | '
                   f'{_pct(r["image_auroc"])} | {_pct(r["pixel_auroc"])} | {_pct(r["au_pro"])} | '
                   f'{r["misclassified"]} | {_pct(r["memory_bank_usage"])} | '
                   f'{r["subsample_seconds"]:.1f} | {r["score_seconds"]:.1f} |')
    t = timings.get(name, {})
    lines += ['', f'Features (extracted once): {t.get("features_seconds", 0):.1f} s; the whole '
              f'category: {t.get("total_seconds", 0):.1f} s.', '']
  lines += ['## The paper', '',
            '- Fig. 5 (a figure, no table): the greedy coreset against random subsampling and '
            'learned basis proxies at 25, 10, 1 and 0.1 %; compare the coreset and random rows '
            'at 1 % and 0.1 % above.',
            '- Sec. 4.4.3 (memory bank usage): without subsampling fewer than 30 % of the bank '
            'rows are some test patch\'s nearest neighbour; at 1 % about 95 % are.',
            '- Bottle, WideResNet-50, PatchCore-10 %: image AUROC 100.0, pixel AUROC 98.6, PRO '
            '96.1 (other backbone weights than here: not comparable row by row).', '']
  return '\n'.join(lines)


def plot(records, metric, *, size=(560, 360)):
  """A PNG (numpy uint8) of `metric` against the percentage (log scale), a line per subsampler;
  None when no record has the metric."""
  points = {}
  for r in records:
    if r.get(metric) is not None:
      points.setdefault(_label(r['variant']), []).append((r['variant']['percentage'], r[metric]))
  if not points:
    return None
  w, h = size
  left, right, top, bottom = 60, 150, 30, 40
  xs = [np.log10(p) for pts in points.values() for p, _ in pts]
  ys = [v for pts in points.values() for _, v in pts]
  x0, x1 = min(xs) - 0.1, max(xs) + 0.1
  y0, y1 = min(ys), max(ys)
  y0, y1 = (y0 - 0.01, y1 + 0.01) if y1 - y0 < 0.02 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
  px = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
  py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
  image = Image.new('RGB', size, 'white')
  draw = ImageDraw.Draw(image)
  draw.rectangle([left, top, w - right, h - bottom], outline='black')
  draw.text((left, 8), f'{metric} against the share of the bank kept', fill='black')
  for p in sorted({r['variant']['percentage'] for r in records}):
    x = px(np.log10(p))
    draw.line([x, h - bottom, x, h - bottom + 4], fill='black')
    draw.text((x - 12, h - bottom + 8), f'{100 * p:g}%', fill='black')
  for frac in np.linspace(0, 1, 5):
    y = y0 + frac * (y1 - y0)
    draw.text((4, py(y) - 6), f'{y:.3f}', fill='black')
  colours = ['#1f77b4', '#d62728', '#2ca02c', '#ff7f0e', '#9467bd']
  for i, (label, pts) in enumerate(sorted(points.items())):
    pts = sorted(pts)
    colour = colours[i % len(colours)]
    xy = [(px(np.log10(p)), py(v)) for p, v in pts]
    if len(xy) > 1:
      draw.line(xy, fill=colour, width=2)
    for x, y in xy:
      draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
    draw.text((w - right + 10, top + 16 * i), label, fill=colour)
  return np.asarray(image)
