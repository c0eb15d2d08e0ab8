"""Sweeps: many PatchCore variants in one process, sharing what they share (job 'sweep').

Every table and figure of the paper is a sweep (configs/paper/). A variant is one value on each
axis of `config.sweep`:

- feature axes (`backbones`, `dtypes`, `hierarchies`, `image_sizes`, `patch_sizes`,
  `strides`): every combination is extracted once per category (`extract`: each training and test image through
  the backbone once), the training patches kept image by image;
- low-shot banks (`shots` x `seeds`): the patches of that many training images, drawn per seed
  from the features already extracted (no re-extraction);
- subsamplers and percentages: 'greedy', the approximate greedy coreset run ONCE to the largest
  percentage (its first n picks are the n-pick coreset: the loop is sequential and
  deterministic, so 25/10/1/0.1 % cost one run; tests check the prefix against a run to n);
  'random', the prefixes of one seeded permutation; 'proxies', learned basis proxies (the
  paper's Eq. 8, `learned_proxies`, optax Adam on minibatches). A percentage of 1.0 is the whole
  bank, the same for every subsampler: scored once, as subsampler 'none';
- search and scoring (`searches`: the exact kNN or IVF-PQ with each `ivfpq.nprobe`, `ks`,
  `distances`, `reweights` (Eq. 7)): per bank, the exact bank and the IVF-PQ index are prepared
  once.

With `ensemble`, the variants that differ only in the backbone are also combined as the
official code combines an ensemble (`combine`).

For every variant: image AUROC, pixel AUROC, AU-PRO, the F1-optimal threshold's misclassified
count, the memory-bank usage (the share of bank rows that are the nearest neighbour of at least
one test patch; the paper: < 30 % without subsampling, ~95 % at 1 %), the time per test image
(the compiled embedding plus the search and maps, compilation excluded) and, for IVF-PQ, its
recall@1 against the exact search.

Writes into `workdir` (atomically): config.json, status.json, sweep.json (a list of records
{"variant": {field: value}, "category", "image_auroc", "pixel_auroc", "au_pro",
"memory_bank_size", "misclassified", "memory_bank_usage", "ms_per_image", ...}), timings.json
(what was shared and what each variant cost), report.md (a table per category, mean ± std over
seeds and over categories, the paper's statements: `sweep_report`), plots/<category>_<metric>.png,
plots/<category>_{roc,pr}.png (image-level curves, Fig. S3), scores/<category>.csv (every
variant's image scores, one column each, named v<record index>), overlays/<category>/ (labelled
anomaly maps of the first variant, with `overlays` > 0).
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

from patchcore_jax import backbones
from patchcore_jax import baselines
from patchcore_jax import coreset
from patchcore_jax import data as data_lib
from patchcore_jax import errors
from patchcore_jax import evaluation
from patchcore_jax import files
from patchcore_jax import ivfpq
from patchcore_jax import knn
from patchcore_jax import memory_bank
from patchcore_jax import model as model_lib
from patchcore_jax import scoring
from patchcore_jax import stages
from patchcore_jax.jobs import config as config_lib
from patchcore_jax.jobs import sweep_report
from patchcore_jax.jobs import workdir as workdir_lib

SUBSAMPLERS = ('greedy', 'random', 'proxies')
PROXY_SIGNS = ('softmin', 'printed')
SEARCHES = ('exact', 'ivfpq')
METHODS = ('patchcore',) + baselines.METHODS
OUTPUTS = ('config.json', 'sweep.json', 'timings.json', 'report.md', 'plots', 'scores',
           'overlays')


# ------------------------------------------------------------------------------- Subsamplers.


def greedy_prefixes(bank_features, percentages, *, key, projection_dim=128, num_starts=10,
                    precision='highest'):
  """{percentage: coreset indices}: one greedy run to the largest percentage, cut to each size."""
  rows = bank_features.shape[0]
  largest = max(p for p in percentages)
  picks = np.asarray(coreset.approximate_greedy_coreset(
      bank_features, percentage=largest, key=key, projection_dim=projection_dim,
      num_starts=num_starts, precision=precision))
  return {p: picks[:coreset.coreset_size(rows, p)] for p in percentages}


def random_prefixes(rows, percentages, *, seed):
  """{percentage: indices}: prefixes of one seeded permutation of the rows."""
  order = np.random.default_rng(seed).permutation(rows).astype(np.int32)
  return {p: order[:coreset.coreset_size(rows, p)] for p in percentages}


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
        jnp.sum(sample * sample, 1)[:, None]
        - 2.0 * jnp.dot(sample, proxies.T, precision=jax.lax.Precision.HIGHEST)
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


# ------------------------------------------------------------------------------- Variants.


def feature_variants(config):
  """Every combination of the sweep's feature axes (each defaulting to the config's value), as
  dicts {backbone, dtype, hierarchy, image_size, patch_size, stride}; hierarchy '' means the
  config's `backbone.stages` (or the backbone's default stages)."""
  sc, fc = config.sweep, config.features
  return [dict(backbone=b, dtype=dt, hierarchy=h, image_size=s, patch_size=p, stride=st)
          for b in (sc.backbones or (config.backbone.name,))
          for dt in (sc.dtypes or (config.backbone.dtype,))
          for h in (sc.hierarchies or ('',))
          for s in (sc.image_sizes or (config.data.image_size,))
          for p in (sc.patch_sizes or (fc.patch_size,))
          for st in (sc.strides or (fc.patch_stride,))]


def feature_settings(settings, config, fv):
  """`settings` with a feature variant's image size (the resize scaled alike: 224/256 ->
  280/320 and 320/366, the official code's pairs), patch size and stride."""
  image_size = fv['image_size']
  resize = int(round(image_size * config.data.resize / config.data.image_size))
  return dataclasses.replace(settings, image_size=image_size, resize=resize,
                             patch_size=fv['patch_size'], stride=fv['stride']).validate()


def load_backbone(spec, fv, *, image_size):
  """The backbone of a feature variant: `spec` (the config's `BackboneSpec`) with the variant's
  backbone name (its own weights and default stages) and the stages of its hierarchy."""
  if fv['backbone'] != spec.name:
    spec = dataclasses.replace(spec, name=fv['backbone'], checkpoint='', stages=())
  if fv['hierarchy']:
    spec = dataclasses.replace(spec, stages=backbones.level_stages(fv['backbone'],
                                                                   fv['hierarchy']))
  return config_lib.load_backbone(spec, image_size=image_size)


def score_variants(config):
  """Every combination of the search and scoring axes: dicts {search, [nprobe], k, distance,
  reweight}."""
  sc, kc = config.sweep, config.knn
  out = []
  for search in sc.searches:
    probes = [dict(nprobe=n) for n in sc.ivfpq.nprobe] if search == 'ivfpq' else [{}]
    for extra in probes:
      for k in sc.ks or (kc.k,):
        for distance in sc.distances or (config.scoring.distance,):
          for reweight in sc.reweights or (config.scoring.reweight,):
            out.append(dict(search=search, **extra, k=k, distance=distance, reweight=reweight))
  return out


def shot_banks(features, rows_per_image, config):
  """Yields ({shots, shot_seed} or {}, bank rows [M, D]): the whole bank, or for every shot
  count and seed the rows of that many training images drawn without replacement."""
  sc = config.sweep
  if not sc.shots:
    yield {}, features.train
    return
  num_images = features.train.shape[0] // rows_per_image
  for shots in sc.shots:
    for seed in sc.seeds:
      images = np.sort(np.random.default_rng(seed).choice(num_images, shots, replace=False))
      rows = (images[:, None] * rows_per_image + np.arange(rows_per_image)[None]).ravel()
      yield dict(shots=shots, shot_seed=seed), features.train[rows]


def variants_of(bank_rows, config, key):
  """Yields (subsampling dict, bank rows [M, D], seconds spent subsampling) for every subsampler
  and percentage of one bank."""
  sc = config.sweep
  rows = bank_rows.shape[0]
  if 1.0 in sc.percentages:  # The whole bank, the same for every subsampler: scored once.
    yield dict(subsampler='none', percentage=1.0), bank_rows, 0.0
  percentages = tuple(sorted(set(sc.percentages) - {1.0}, reverse=True))
  if not percentages:
    return
  for p in percentages:
    if coreset.coreset_size(rows, p) < 1:
      raise errors.UserError(f'config.sweep.percentages: {p:g} of {rows} bank rows keeps none '
                             '(fewer shots or a lower percentage); raise it')
  for name in sc.subsamplers:
    start = time.perf_counter()
    if name == 'greedy':
      picks = greedy_prefixes(bank_rows, percentages, key=key,
                              projection_dim=config.coreset.projection_dim,
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
              bank_rows, coreset.coreset_size(rows, p), seed=config.seed, steps=sc.proxies.steps,
              batch_size=sc.proxies.batch_size, learning_rate=sc.proxies.learning_rate,
              sign=sign)
          yield (dict(subsampler='proxies', percentage=p, proxy_sign=sign), bank,
                 time.perf_counter() - start)
        continue
      yield dict(subsampler=name, percentage=p), bank_rows[picks[p]], shared
      shared = 0.0  # Counted once, with the first size.


# ---------------------------------------------------------------------------------- Scoring.


@dataclasses.dataclass
class Features:
  """One category's features for one feature variant, extracted once for every variant."""
  train: np.ndarray  # [N * h * w, D] the whole memory bank, image by image.
  test: np.ndarray  # [n_test, h, w, D].
  labels: np.ndarray  # [n_test].
  masks: np.ndarray  # [n_test, S, S] bool.
  has_masks: bool
  seconds: float  # Everything: decoding, compilation, training and test features.
  test_seconds: float = 0.0  # The test images' compiled embedding calls only.


def extract(backbone, split, settings, *, num_workers=0):
  """Training bank and test features of `split`, each image through the backbone once."""
  start = time.perf_counter()
  stages.precompile(backbone, settings)
  embed = lambda x: stages.embed_batch(backbone, x, settings)
  batches = lambda samples, **kw: data_lib.to_device(data_lib.iterate_batches(
      samples, batch_size=settings.batch_size, image_config=settings.image_config,
      num_workers=num_workers, **kw))
  train = memory_bank.build_memory_bank(embed, batches(split.train), num_images=len(split.train))
  test, masks, test_seconds = [], [], 0.0
  for batch in batches(split.test, with_masks=True):
    begin = time.perf_counter()
    test.append(np.asarray(embed(batch.images))[:batch.count])
    test_seconds += time.perf_counter() - begin
    masks.append(batch.masks[:batch.count])
  return Features(train=train, test=np.concatenate(test), masks=np.concatenate(masks),
                  labels=np.array([s.label for s in split.test]), has_masks=split.has_masks,
                  seconds=time.perf_counter() - start, test_seconds=test_seconds)


def build_index(bank_rows, config, key):
  """The IVF-PQ index of a bank (`config.sweep.ivfpq`); errors.UserError when it is too small."""
  ic = config.sweep.ivfpq
  rows = bank_rows.shape[0]
  if rows < max(ic.nlist, ivfpq.CODEBOOK_SIZE):
    raise errors.UserError(f'config.sweep.ivfpq.nlist={ic.nlist}: a bank of {rows} rows is too '
                           f'small for it (needs >= max(nlist, {ivfpq.CODEBOOK_SIZE}) rows)')
  if bank_rows.shape[1] % ic.subquantizers:
    raise errors.UserError(f'config.sweep.ivfpq.subquantizers={ic.subquantizers} does not divide '
                           f'the feature dimension {bank_rows.shape[1]}')
  return ivfpq.build(bank_rows, nlist=ic.nlist, subquantizers=ic.subquantizers, key=key,
                     train_rows=ic.train_rows, iterations=ic.iterations,
                     precision=config.knn.precision)


def evaluate(bank_rows, feats, *, settings, search='exact', index=None, nprobe=1, bank=None):
  """Scores `feats` against the bank `bank_rows` [M, D] as a fitted model would
  (`evaluation.score_features`: k, distance, Eq. 7 and sigma from `settings`), or through the
  IVF-PQ `index` (search='ivfpq'). `bank`: the prepared `knn.Bank` of bank_rows, if already made.

  Returns:
    (the metrics record of one variant, image scores [n], maps [n, S, S], each test patch's
    nearest bank row [n, h * w]).
  """
  start = time.perf_counter()
  if search == 'exact' and bank is None:
    bank = knn.prepare_bank(bank_rows, block_size=settings.block_size, screen=settings.screen)
  image_scores, maps, nearest, compute = evaluation.score_features(
      bank if search == 'exact' else index, feats.test, settings,
      nprobe=None if search == 'exact' else nprobe)
  used = np.zeros((bank_rows.shape[0],), bool)
  used[nearest[nearest >= 0]] = True
  record = {
      **scores_record(feats.labels, image_scores, feats.masks, maps, feats.has_masks),
      'memory_bank_size': int(bank_rows.shape[0]),
      'memory_bank_usage': float(used.mean()),
      'score_ms_per_image': 1000.0 * compute / len(feats.test),
      'score_seconds': time.perf_counter() - start,
  }
  return record, image_scores, maps, nearest


def scores_record(labels, image_scores, masks, maps, has_masks):
  """Image AUROC, pixel AUROC and AU-PRO (None without masks), and the number of test images on
  the wrong side of the F1-optimal image threshold."""
  record = evaluation.metric_record(labels, image_scores, *((masks, maps) if has_masks else ()))
  record['misclassified'] = evaluation.test_thresholds(labels, image_scores).get('misclassified')
  return record


def combine(runs):
  """The official ensemble: per member, image scores min-max normalised over the test set, then
  averaged; maps likewise (each member's min and max over all its test maps).

  Args:
    runs: a list of (image scores [n], maps [n, S, S]).
  Returns:
    (image scores [n], maps [n, S, S]).
  """
  norm = lambda x: (x - x.min()) / max(float(x.max() - x.min()), 1e-12)
  return (np.mean([norm(s) for s, _ in runs], axis=0),
          np.mean([norm(m) for _, m in runs], axis=0))


def ensemble_records(kept, labels, masks, has_masks, backbones_needed):
  """Records of the backbone ensembles: every group of variants that differ only in the
  backbone (and its stages), with a run for each backbone in `backbones_needed`.

  Args:
    kept: (variant, image scores [n], maps [n, S, S], ms per image) of every variant.
  """
  groups = {}
  for variant, scores, maps, ms in kept:
    key = tuple((k, v) for k, v in variant.items() if k not in ('backbone', 'stages'))
    groups.setdefault(key, {})[variant['backbone']] = (scores, maps, ms)
  out = []
  for key, members in groups.items():
    if set(members) != set(backbones_needed):
      continue
    scores, maps = combine([members[b][:2] for b in backbones_needed])
    out.append(dict(key) | {
        'backbone': 'ensemble:' + '+'.join(backbones_needed), 'stages': '',
        '_record': {
            **scores_record(labels, scores, masks, maps, has_masks),
            # Every member's embedding and search, one after the other.
            'ms_per_image': float(sum(members[b][2] for b in backbones_needed))},
        '_scores': scores})
  return out


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
  bad = [m for m in sc.methods if m not in METHODS]
  if not sc.methods or bad:
    raise errors.UserError(f'config.sweep.methods={tuple(sc.methods)!r} is not allowed: must be '
                           f'some of {METHODS}')
  bad = [d for d in sc.dtypes if d not in backbones.DTYPES]
  if bad:
    raise errors.UserError(f'config.sweep.dtypes={tuple(sc.dtypes)!r} is not allowed: must be '
                           f'some of {backbones.DTYPES}')
  bad = [b for b in sc.backbones if b not in backbones.NAMES]
  if bad:
    raise errors.UserError(f'config.sweep.backbones={tuple(sc.backbones)!r}: {bad} not among '
                           f'{backbones.NAMES}')
  for name in sc.backbones or (config.backbone.name,):
    for h in sc.hierarchies:
      try:
        backbones.level_stages(name, h)
      except ValueError as error:
        raise errors.UserError(f'config.sweep.hierarchies={tuple(sc.hierarchies)!r}: {error}')
  for field, low in (('image_sizes', 16), ('patch_sizes', 1), ('strides', 1), ('ks', 1),
                     ('shots', 1)):
    if any(v < low for v in sc[field]):
      raise errors.UserError(f'config.sweep.{field}={tuple(sc[field])!r} is not allowed: every '
                             f'value must be >= {low}')
  if sc.shots and not sc.seeds:
    raise errors.UserError('config.sweep.seeds is empty: low-shot banks need at least one seed')
  bad = [d for d in sc.distances if d not in scoring.DISTANCES]
  if bad:
    raise errors.UserError(f'config.sweep.distances={tuple(sc.distances)!r} is not allowed: must '
                           f'be some of {scoring.DISTANCES}')
  bad = [s for s in sc.searches if s not in SEARCHES]
  if not sc.searches or bad:
    raise errors.UserError(f'config.sweep.searches={tuple(sc.searches)!r} is not allowed: must be '
                           f'some of {SEARCHES}')
  ic = sc.ivfpq
  if 'ivfpq' in sc.searches:
    if True in (sc.reweights or (config.scoring.reweight,)):
      raise errors.UserError('config.sweep.searches includes ivfpq with Eq. 7 reweighting '
                             '(scoring.reweight / sweep.reweights): reweighting needs the exact '
                             'search')
    for field in ('nlist', 'subquantizers', 'train_rows', 'iterations'):
      if ic[field] < 1:
        raise errors.UserError(f'config.sweep.ivfpq.{field}={ic[field]!r} is not allowed: must '
                               'be >= 1')
    if not ic.nprobe or any(n < 1 or n > ic.nlist for n in ic.nprobe):
      raise errors.UserError(f'config.sweep.ivfpq.nprobe={tuple(ic.nprobe)!r} is not allowed: '
                             f'every value in [1, nlist={ic.nlist}]')
  if sc.ensemble and len(sc.backbones) < 2:
    raise errors.UserError('config.sweep.ensemble=True needs at least two config.sweep.backbones')
  if sc.overlays < 0:
    raise errors.UserError(f'config.sweep.overlays={sc.overlays!r} is not allowed: must be >= 0')


def _write_overlays(directory, split, settings, labels, scores, maps, masks, count):
  """Labelled overlays (`evaluation.write_overlays`) of one variant, coloured on the fixed
  scale [0, 2 x its F1-optimal threshold]."""
  calibration = evaluation.calibrate_on_test(model_lib.Calibration(),
                                             evaluation.test_thresholds(labels, scores))
  if calibration.image_threshold is None:
    return
  evaluation.write_overlays(directory, split, calibration, settings.image_config, scores, maps,
                            masks, count)


def _searches(variant, bank_rows, features, settings, config, key):
  """Yields (variant, record, image scores, maps, extra) for every search and scoring variant of
  one bank (`score_variants`); the exact bank and the IVF-PQ index are prepared once, when first
  needed, and the exact neighbours are kept for IVF-PQ's recall@1."""
  ic = config.sweep.ivfpq
  prepared = {}

  def exact_bank():
    if 'bank' not in prepared:
      prepared['bank'] = knn.prepare_bank(bank_rows, block_size=settings.block_size,
                                          screen=settings.screen)
    return prepared['bank']

  exact_nearest = None
  for scv in score_variants(config):
    if scv['search'] == 'ivfpq' and ic.percentages and variant['percentage'] not in ic.percentages:
      continue
    full = dict(variant, **scv)
    ssettings = dataclasses.replace(settings, k=scv['k'], distance=scv['distance'],
                                    reweight=scv['reweight'])
    if ssettings.k > bank_rows.shape[0]:
      raise errors.UserError(f'k = {ssettings.k} (config.sweep.ks / knn.k) is larger than a '
                             f'memory bank of {bank_rows.shape[0]} rows ({full})')
    extra = {}
    if scv['search'] == 'exact':
      record, scores, maps, nearest = evaluate(bank_rows, features, settings=ssettings,
                                               bank=exact_bank())
      exact_nearest = nearest if exact_nearest is None else exact_nearest
    else:
      if 'index' not in prepared:
        begin = time.perf_counter()
        prepared['index'] = build_index(bank_rows, config, jax.random.fold_in(key, 7))
        extra['index_seconds'] = time.perf_counter() - begin
      record, scores, maps, nearest = evaluate(bank_rows, features, settings=ssettings,
                                               search='ivfpq', index=prepared['index'],
                                               nprobe=scv['nprobe'])
      if exact_nearest is None:  # The exact neighbours, for recall@1 only.
        exact_nearest = evaluate(bank_rows, features, settings=dataclasses.replace(ssettings, k=1),
                                 bank=exact_bank())[3]
      extra['recall_at_1'] = ivfpq.recall_at_1(nearest, exact_nearest)
    yield full, record, scores, maps, extra


def _baseline(config, method, fv, split, settings, key, loaded):
  """One baseline (`baselines.METHODS`) on one category with a feature variant's backbone and
  dtype, at config.data.image_size: (record, image scores, labels, masks, has_masks)."""
  # One backbone per name serves every baseline: it returns the union of their stages.
  if (fv['backbone'], 'baselines') not in loaded:
    _, strides = backbones.build_model(fv['backbone'], backbones.DEFAULT_STAGES[fv['backbone']])
    needed = {s for m in config.sweep.methods if m in baselines.METHODS
              for s in baselines.method_stages(m, strides)}
    spec = dataclasses.replace(
        config_lib.backbone_spec(config), name=fv['backbone'],
        checkpoint='' if fv['backbone'] != config.backbone.name else config.backbone.checkpoint,
        stages=tuple(s for s in strides if s in needed))
    loaded[fv['backbone'], 'baselines'] = spec.load(image_size=settings.image_size)
  backbone = backbones.with_dtype(loaded[fv['backbone'], 'baselines'], fv['dtype'])
  stages = baselines.method_stages(method, backbone.strides)
  masks = []

  def batches(samples, with_masks=False):
    for batch in data_lib.to_device(data_lib.iterate_batches(
        samples, batch_size=settings.batch_size, image_config=settings.image_config,
        with_masks=with_masks, num_workers=config.data.num_workers)):
      if with_masks:
        masks.append(batch.masks[:batch.count])
      yield batch

  run = baselines.fit_and_score(method, backbone, batches(split.train),
                                batches(split.test, with_masks=True),
                                image_size=settings.image_size, key=key, stages=stages)
  labels = np.array([s.label for s in split.test])
  masks = np.concatenate(masks)
  has_masks = split.has_masks
  record = scores_record(labels, run.image_scores, masks,
                         run.maps if run.maps is not None else None,
                         has_masks and run.maps is not None)
  if run.maps is None and has_masks:
    record.setdefault('metric_notes', {}).update(
        {m: f'{method} scores whole images (no anomaly map)' for m in ('pixel_auroc', 'au_pro')})
  n = len(split.test)
  record.update(
      variant=dict(method=method, backbone=fv['backbone'], dtype=fv['dtype'],
                   stages='+'.join(stages), image_size=settings.image_size),
      memory_bank_size=None, memory_bank_usage=None, fit_seconds=run.fit_seconds,
      subsample_seconds=run.fit_seconds, score_seconds=run.test_seconds,
      ms_per_image=1000.0 * run.test_seconds / n)
  return record, run.image_scores, labels, masks, has_masks


def _category(config, name, split, settings, key, workdir, records, timings, loaded):
  """Every variant of one category; appends to `records`, fills timings[name]; `loaded` holds the
  backbones loaded so far, by (name, hierarchy)."""
  sc = config.sweep
  t = timings[name] = {'features': [], 'variants': []}
  start = time.perf_counter()
  kept, columns, overlay_done = [], [], False
  labels = masks = has_masks = None
  for fv in feature_variants(config) if 'patchcore' in sc.methods else ():
    fsettings = feature_settings(settings, config, fv)
    if (fv['backbone'], fv['hierarchy']) not in loaded:  # Once per process, as the compilation.
      loaded[fv['backbone'], fv['hierarchy']] = load_backbone(
          config_lib.backbone_spec(config), fv, image_size=config.data.image_size)
    backbone = backbones.with_dtype(loaded[fv['backbone'], fv['hierarchy']], fv['dtype'])
    features = extract(backbone, split, fsettings, num_workers=config.data.num_workers)
    labels, masks, has_masks = features.labels, features.masks, features.has_masks
    _, h, w, _ = features.test.shape
    embed_ms = 1000.0 * features.test_seconds / len(split.test)
    t['features'].append(dict(feature_variant=fv, seconds=features.seconds,
                              embed_ms_per_image=embed_ms, bank_rows=features.train.shape[0]))
    logging.info('[%s] %s: features of %d training and %d test images in %.1f s (%.1f ms per '
                 'test image)', name, fv, len(split.train), len(split.test), features.seconds,
                 embed_ms)
    base = dict(fv, method='patchcore', stages='+'.join(backbone.stages))
    for shot, bank_all in shot_banks(features, h * w, config):
      for sub, bank_rows, seconds in variants_of(bank_all, config, key):
        for variant, record, scores, maps, extra in _searches(
            dict(base, **shot, **sub), bank_rows, features, fsettings, config, key):
          record.update(variant=variant, category=name, subsample_seconds=seconds,
                        embed_ms_per_image=embed_ms,
                        ms_per_image=embed_ms + record['score_ms_per_image'], **extra)
          records.append(record)
          columns.append((f'v{len(records) - 1}', scores))
          if sc.ensemble:
            kept.append((variant, scores, maps, record['ms_per_image']))
          if sc.overlays and not overlay_done:
            _write_overlays(os.path.join(workdir, 'overlays', name), split, fsettings, labels,
                            scores, maps, masks, sc.overlays)
            overlay_done = True
          t['variants'].append(dict(variant=variant, subsample_seconds=seconds,
                                    score_seconds=record['score_seconds'], **extra))
          logging.info('[%s] %s: image AUROC %.4f, bank %d, usage %.3f, %.1f ms per image '
                       '(%.1f s + %.1f s)', name, variant, record['image_auroc'],
                       record['memory_bank_size'], record['memory_bank_usage'],
                       record['ms_per_image'], seconds, record['score_seconds'])
          files.write_json(os.path.join(workdir, 'sweep.json'), records)
          seconds = 0.0  # The subsampling is counted once, with its first scoring.
    del features, bank_all, bank_rows  # Before the next variant's extraction.
  for method in (m for m in sc.methods if m != 'patchcore'):
    for fv in feature_variants(config):
      record, scores, labels, masks, has_masks = _baseline(config, method, fv, split, settings,
                                                           key, loaded)
      record.update(category=name)
      records.append(record)
      columns.append((f'v{len(records) - 1}', scores))
      t['variants'].append(dict(variant=record['variant'], fit_seconds=record['fit_seconds'],
                                score_seconds=record['score_seconds']))
      logging.info('[%s] %s: image AUROC %.4f, %.1f ms per image (fit %.1f s)', name,
                   record['variant'], record['image_auroc'], record['ms_per_image'],
                   record['fit_seconds'])
      files.write_json(os.path.join(workdir, 'sweep.json'), records)
  if sc.ensemble:
    needed = tuple(dict.fromkeys(sc.backbones))
    for e in ensemble_records(kept, labels, masks, has_masks, needed):
      record, scores = e.pop('_record'), e.pop('_scores')
      record.update(variant=e, category=name, memory_bank_size=None, memory_bank_usage=None)
      records.append(record)
      columns.append((f'v{len(records) - 1}', scores))
      logging.info('[%s] %s: image AUROC %.4f', name, e, record['image_auroc'])
    files.write_json(os.path.join(workdir, 'sweep.json'), records)
  evaluation.write_scores_csv(os.path.join(workdir, 'scores', f'{name}.csv'), split, labels,
                              columns)
  first = len(records) - len(columns)
  for kind in ('roc', 'pr'):
    image = sweep_report.curve_plot(records[first:], [c[1] for c in columns], labels, kind)
    if image is not None:
      files.save_png(os.path.join(workdir, 'plots', f'{name}_{kind}.png'), image)
  t['total_seconds'] = time.perf_counter() - start


def run(config, workdir):
  """Runs the sweep `config.sweep` describes over every category; returns the records."""
  validate(config)
  experiment = config_lib.read_experiment(config)
  settings = experiment.settings
  splits = data_lib.get_splits(experiment.data)
  if config.data.max_train_images > 0:  # As an experiment run: the first N training images.
    splits = {name: dataclasses.replace(split, train=split.train[:config.data.max_train_images])
              for name, split in splits.items()}
  for name, split in splits.items():
    data_lib.check_split(split)
    if config.sweep.shots and max(config.sweep.shots) > len(split.train):
      raise errors.UserError(f'config.sweep.shots={tuple(config.sweep.shots)!r}: {name} has only '
                             f'{len(split.train)} training images')
  with workdir_lib.running(workdir, job='sweep', outputs=OUTPUTS,
                          overwrite=config.output.overwrite) as run_status:
    files.write_text(os.path.join(workdir, 'config.json'), config.to_json_best_effort(indent=2))
    records, timings, loaded = [], {}, {}
    start = time.perf_counter()
    for i, (name, split) in enumerate(splits.items()):
      key = jax.random.fold_in(jax.random.key(config.seed), i)
      _category(config, name, split, settings, key, workdir, records, timings, loaded)
      run_status.mark_done(name)
    timings['wall_seconds'] = time.perf_counter() - start
    files.write_json(os.path.join(workdir, 'timings.json'), timings)
    files.write_text(os.path.join(workdir, 'report.md'),
                     sweep_report.report(records, config, timings))
    for name in splits:
      for metric in ('image_auroc', 'pixel_auroc', 'au_pro', 'memory_bank_usage'):
        image = sweep_report.plot([r for r in records if r['category'] == name], metric)
        if image is not None:
          files.save_png(os.path.join(workdir, 'plots', f'{name}_{metric}.png'), image)
  return records
