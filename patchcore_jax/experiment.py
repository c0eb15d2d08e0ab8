"""run(config, workdir): PatchCore on every category of a dataset, from images to metrics.

Writes into `workdir`:
  config.json                  the full config
  results.json                 {category: {image_auroc, pixel_auroc, au_pro, memory_bank_size,
                                fit_seconds, inference_seconds_per_image, ...}}
  results.md                   the same as a table
  scores/<category>.csv        path,label,score per test image
  maps/<category>/*.png        overlays for some test images: input | anomaly map | blend
"""
import csv
import json
import os
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from patchcore_jax import backbones
from patchcore_jax import data as data_lib
from patchcore_jax import features as features_lib
from patchcore_jax import metrics
from patchcore_jax import patchcore
from patchcore_jax import visualize


def _image_config(data_config):
  return dict(resize=data_config.resize, image_size=data_config.image_size,
              transform=data_config.transform)


def _load_backbone(config):
  bb = config.backbone
  stages = tuple(bb.stages) or None
  seed = bb.random_seed if bb.random_seed >= 0 else None
  backbone = backbones.load_backbone(bb.name, stages=stages, checkpoint=bb.checkpoint,
                                     cache_dir=bb.cache_dir, random_seed=seed)
  backbone = backbones.official_bn_probe(backbone, image_size=config.data.image_size,
                                         passes=bb.official_bn_probe_passes)
  return backbones.fold_batchnorm(backbone) if bb.fold_batchnorm else backbone


def _overlay_indices(split, count):
  """Up to `count` test images: mostly anomalous ones, spread over defect types, plus good ones."""
  bad = [i for i, s in enumerate(split.test) if s.label == 1]
  good = [i for i, s in enumerate(split.test) if s.label == 0]
  n_good = min(len(good), max(1, count // 4))
  pick = lambda xs, n: [xs[int(j)] for j in np.linspace(0, len(xs) - 1, n)] if n and xs else []
  return sorted(set(pick(bad, min(len(bad), count - n_good)) + pick(good, n_good)))


def run_category(config, backbone, split, workdir, key):
  """Fits PatchCore on `split.train`, evaluates on `split.test`; returns the results record."""
  dc = config.data
  image_config = _image_config(dc)
  fc = config.features
  embed_kwargs = dict(patch_size=fc.patch_size, stride=fc.patch_stride,
                      pretrain_dim=fc.pretrain_dim, target_dim=fc.target_dim)
  train = split.train[:dc.max_train_images] if dc.max_train_images > 0 else split.train
  logging.info('[%s] %d training, %d test images (%d anomalous)', split.name, len(train),
               len(split.test), sum(s.label for s in split.test))

  # Compile the embedding once, separately from the timed fit.
  batch_spec = jax.ShapeDtypeStruct((dc.batch_size, dc.image_size, dc.image_size, 3), jnp.float32)
  embed_jit = jax.jit(lambda v, x: features_lib.embed(backbone.model.apply, v, x,
                                                      stages=backbone.stages, **embed_kwargs))
  t0 = time.perf_counter()
  embed_compiled = embed_jit.lower(backbone.variables, batch_spec).compile()
  compile_seconds = time.perf_counter() - t0

  # Fit: memory bank, then coreset.
  t0 = time.perf_counter()
  batches = data_lib.iterate_batches(train, batch_size=dc.batch_size, image_config=image_config,
                                     num_workers=dc.num_workers)
  bank_features = patchcore.build_memory_bank(
      lambda x: embed_compiled(backbone.variables, x), batches, num_images=len(train))
  extract_seconds = time.perf_counter() - t0
  t1 = time.perf_counter()
  cc = config.coreset
  bank, _ = patchcore.subsample(
      bank_features, percentage=cc.percentage, key=key, projection_dim=cc.projection_dim,
      num_starts=cc.num_starts, block_size=config.knn.block_size, precision=config.knn.precision,
      screen=config.knn.screen)
  jax.block_until_ready(bank)
  coreset_seconds = time.perf_counter() - t1
  fit_seconds = time.perf_counter() - t0
  bank_size = bank.size
  logging.info('[%s] memory bank %d -> %d patches (%.1f %%); features %.1f s, coreset %.1f s',
               split.name, bank_features.shape[0], bank_size, 100 * cc.percentage,
               extract_seconds, coreset_seconds)
  del bank_features

  # Predict.
  sc = config.scoring
  predict = patchcore.predict_fn(
      backbone, image_size=dc.image_size, k=config.knn.k, distance=sc.distance,
      sigma=sc.sigma, reweight=sc.reweight, reweight_neighbours=sc.reweight_neighbours,
      precision=config.knn.precision, **embed_kwargs)
  t0 = time.perf_counter()
  predict_compiled = predict.lower(backbone.variables, bank, batch_spec).compile()
  compile_seconds += time.perf_counter() - t0
  n_test = len(split.test)
  image_scores = np.empty((n_test,), np.float32)
  maps = np.empty((n_test, dc.image_size, dc.image_size), np.float32)
  masks = np.empty((n_test, dc.image_size, dc.image_size), bool)
  done = 0
  inference_seconds = 0.0
  for images, batch_masks, count in data_lib.iterate_batches(
      split.test, batch_size=dc.batch_size, image_config=image_config, with_masks=True,
      num_workers=dc.num_workers):
    t0 = time.perf_counter()
    scores, batch_maps, _ = predict_compiled(backbone.variables, bank, jnp.asarray(images))
    scores, batch_maps = np.asarray(scores), np.asarray(batch_maps)  # Waits for the result.
    inference_seconds += time.perf_counter() - t0
    image_scores[done:done + count] = scores[:count]
    maps[done:done + count] = batch_maps[:count]
    masks[done:done + count] = batch_masks[:count]
    done += count
    logging.log_every_n_seconds(logging.INFO, '[%s] scored %d/%d test images', 10, split.name,
                                done, n_test)

  labels = np.array([s.label for s in split.test])
  has_masks = split.has_masks
  result = {
      'image_auroc': metrics.image_auroc(labels, image_scores),
      'pixel_auroc': metrics.pixel_auroc(masks, maps) if has_masks else None,
      'au_pro': metrics.au_pro(masks, maps) if has_masks else None,
      'memory_bank_size': bank_size,
      'fit_seconds': fit_seconds,
      'inference_seconds_per_image': inference_seconds / n_test,
      'feature_seconds': extract_seconds,
      'coreset_seconds': coreset_seconds,
      'compile_seconds': compile_seconds,
      'num_train_images': len(train),
      'num_test_images': n_test,
  }
  _write_scores(os.path.join(workdir, 'scores', f'{split.name}.csv'), split, labels, image_scores)
  _write_overlays(os.path.join(workdir, 'maps', split.name), split, maps, masks, image_config,
                  config.output.num_overlays)
  return result


def _write_scores(path, split, labels, scores):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['path', 'label', 'score'])
    for sample, label, score in zip(split.test, labels, scores):
      writer.writerow([os.path.relpath(sample.path, split.root), int(label), repr(float(score))])


def _write_overlays(directory, split, maps, masks, image_config, count):
  if count <= 0:
    return
  os.makedirs(directory, exist_ok=True)
  vmin, vmax = float(maps.min()), float(maps.max())
  for i in _overlay_indices(split, count):
    sample = split.test[i]
    image = data_lib.load_image(sample.path, **image_config)
    stem = os.path.splitext(os.path.basename(sample.path))[0]
    visualize.save_overlay(os.path.join(directory, f'{sample.defect}_{stem}.png'), image, maps[i],
                           masks[i], vmin=vmin, vmax=vmax)


def _fmt(value, pct=True):
  if value is None:
    return 'n/a'
  return f'{100 * value:.2f}' if pct else f'{value:.1f}'


def results_table(results):
  """Markdown table of a results dict (metrics in percent)."""
  lines = ['| category | image AUROC | pixel AUROC | AU-PRO | memory bank | fit s | ms / image |',
           '|---|---|---|---|---|---|---|']
  for name, r in results.items():
    lines.append(f'| {name} | {_fmt(r["image_auroc"])} | {_fmt(r["pixel_auroc"])} | '
                 f'{_fmt(r["au_pro"])} | {r["memory_bank_size"]:,} | {r["fit_seconds"]:.1f} | '
                 f'{1000 * r["inference_seconds_per_image"]:.1f} |')
  return '\n'.join(lines)


def run(config, workdir):
  """Runs PatchCore as `config` says on every category; writes outputs into `workdir`.

  Returns:
    {category: result record} (also in workdir/results.json).
  """
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  splits = data_lib.get_splits(config.data)
  backbone = _load_backbone(config)
  logging.info('backbone %s, stages %s (strides %s)', backbone.name, backbone.stages,
               [backbone.strides.get(s) for s in backbone.stages])
  results = {}
  for i, (name, split) in enumerate(splits.items()):
    key = jax.random.fold_in(jax.random.key(config.seed), i)
    results[name] = run_category(config, backbone, split, workdir, key)
    with open(os.path.join(workdir, 'results.json'), 'w') as f:
      json.dump(results, f, indent=2)
  table = results_table(results)
  with open(os.path.join(workdir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  logging.info('results (%s, %s, coreset %.0f %%):\n%s', config.data.name, backbone.name,
               100 * config.coreset.percentage, table)
  return results
