"""The config boundary: a job's ConfigDict becomes the library's records here, once.

  experiment = read_experiment(config, workdir)   # Settings, BackboneSpec, DataSpec, RunOptions
  backbone = load_backbone(experiment.backbone, image_size=experiment.settings.image_size)

Every field is checked before any work; a bad value raises errors.UserError naming the config
field, its value and what is allowed. Nothing here changes the config. The configs' fields are
documented in configs/common.py.
"""
import dataclasses
import os
from typing import Optional

import jax

from patchcore_jax import backbones
from patchcore_jax.backbones import layers
from patchcore_jax import data as data_lib
from patchcore_jax import errors
from patchcore_jax import multihost
from patchcore_jax import sharded
from patchcore_jax.model import Settings

# The config field each setting comes from, for messages.
CONFIG_FIELDS = {
    'transform': 'data.transform', 'resize': 'data.resize', 'image_size': 'data.image_size',
    'patch_size': 'features.patch_size', 'stride': 'features.patch_stride',
    'pretrain_dim': 'features.pretrain_dim', 'target_dim': 'features.target_dim',
    'percentage': 'coreset.percentage', 'projection_dim': 'coreset.projection_dim',
    'num_starts': 'coreset.num_starts', 'coreset_method': 'coreset.method', 'seed': 'seed',
    'k': 'knn.k',
    'block_size': 'knn.block_size', 'precision': 'knn.precision', 'screen': 'knn.screen',
    'distance': 'scoring.distance', 'sigma': 'scoring.sigma', 'reweight': 'scoring.reweight',
    'reweight_neighbours': 'scoring.reweight_neighbours', 'batch_size': 'data.batch_size',
}
# How messages name a setting: 'k (knn.k)'.
SETTING_NAMES = {field: f'{field} ({source})' for field, source in CONFIG_FIELDS.items()}


@dataclasses.dataclass(frozen=True)
class RunOptions:
  """How an experiment runs, beside the model's settings."""
  seed: int = 0
  num_workers: int = 0  # Image-decoding threads (0: data.common.decode_workers).
  max_train_images: int = -1  # > 0: only the first N training images.
  holdout: float = 0.0  # Fraction of the training images held out to calibrate on.
  target_fpr: float = 0.01
  memory_budget_bytes: int = 8 * 2**30  # A larger bank streams to a file in spill_dir.
  spill_dir: Optional[str] = None
  devices: int = 1  # Devices of this process to split the work over.
  progress: bool = False
  num_overlays: int = 8
  save_model: bool = True
  overwrite: bool = False


@dataclasses.dataclass(frozen=True)
class Experiment:
  """Everything an experiment config says, as the library's records."""
  settings: Settings
  backbone: backbones.BackboneSpec
  data: data_lib.DataSpec
  options: RunOptions


def check(field, value, ok, allowed):
  """Raises errors.UserError 'config.<field>=<value> is not allowed: must be <allowed>'."""
  if not ok:
    raise errors.UserError(f'config.{field}={value!r} is not allowed: must be {allowed}')


def _block_size(value):
  """config.knn.block_size ('auto', or a positive integer, given as text on the command line)."""
  if isinstance(value, str) and value.strip().isdigit():
    return int(value)
  return value  # 'auto', or a bad value Settings.validate names.


def _screen(value):
  """config.knn.screen ('auto', True or False, any case as text)."""
  if isinstance(value, str):
    return {'true': True, 'false': False, 'auto': 'auto'}.get(value.strip().lower(), value)
  return value


def settings_from_config(config):
  """The validated `Settings` a config describes."""
  dc, fc, cc, kc, sc = config.data, config.features, config.coreset, config.knn, config.scoring
  return Settings(
      transform=dc.transform, resize=dc.resize, image_size=dc.image_size,
      patch_size=fc.patch_size, stride=fc.patch_stride, pretrain_dim=fc.pretrain_dim,
      target_dim=fc.target_dim, percentage=cc.percentage, projection_dim=cc.projection_dim,
      num_starts=cc.num_starts, coreset_method=cc.method, seed=config.seed, k=kc.k,
      block_size=_block_size(kc.block_size),
      precision=kc.precision, screen=_screen(kc.screen), distance=sc.distance, sigma=sc.sigma,
      reweight=sc.reweight, reweight_neighbours=sc.reweight_neighbours,
      batch_size=dc.batch_size).validate(names=SETTING_NAMES)


def backbone_spec(config):
  """The `BackboneSpec` of `config.backbone`, checked."""
  bb = config.backbone
  check('backbone.name', bb.name, bb.name in backbones.NAMES, f'one of {backbones.NAMES}')
  _, strides = backbones.build_model(bb.name, backbones.DEFAULT_STAGES[bb.name])
  stages = tuple(bb.stages)
  check('backbone.stages', stages, all(s in strides for s in stages),
        f'stages of {bb.name}: {tuple(strides)} (empty: its default '
        f'{backbones.DEFAULT_STAGES[bb.name]})')
  check('backbone.official_bn_probe_passes', bb.official_bn_probe_passes,
        bb.official_bn_probe_passes >= 0, '>= 0')
  check('backbone.conv', bb.conv, bb.conv in layers.CONV_IMPLS, f'one of {layers.CONV_IMPLS}')
  check('backbone.dtype', bb.dtype, bb.dtype in backbones.DTYPES, f'one of {backbones.DTYPES}')
  if bb.checkpoint and not os.path.isfile(bb.checkpoint):
    raise errors.UserError(f'config.backbone.checkpoint={bb.checkpoint!r}: no such file')
  return backbones.BackboneSpec(
      name=bb.name, stages=stages, checkpoint=bb.checkpoint, cache_dir=bb.cache_dir,
      random_seed=bb.random_seed if bb.random_seed >= 0 else None,
      probe_passes=bb.official_bn_probe_passes, fold=bb.fold_batchnorm, conv=bb.conv,
      dtype=bb.dtype)


def data_spec(config, workdir=None):
  """The `DataSpec` of `config.data`, checked; for the synthetic data an empty root means
  `<workdir>/data` (generated there once)."""
  dc = config.data
  check('data.name', dc.name, dc.name in data_lib.DATASETS, f'one of {data_lib.DATASETS}')
  check('data.source', dc.source, dc.source in data_lib.SOURCES, f'one of {data_lib.SOURCES}')
  if dc.name == 'mvtec':
    unknown = [c for c in dc.categories if c not in data_lib.MVTEC_CATEGORIES]
    check('data.categories', tuple(dc.categories),
          tuple(dc.categories) == ('all',) or (dc.categories and not unknown),
          f"MVTec AD categories, some of {data_lib.MVTEC_CATEGORIES}, or ('all',): every one "
          'present under data.root')
  if dc.name == 'synthetic':
    unknown = [c for c in dc.categories if c not in data_lib.SYNTHETIC_CATEGORIES]
    check('data.categories', tuple(dc.categories), dc.categories and not unknown,
          f'some of {data_lib.SYNTHETIC_CATEGORIES}')
  root = dc.root
  if dc.name == 'synthetic' and not root and workdir:
    root = os.path.join(workdir, 'data')
  return data_lib.DataSpec(name=dc.name, root=root, categories=tuple(dc.categories),
                           source=dc.source, tfds_data_dir=dc.tfds_data_dir)


def run_options(config):
  """The `RunOptions` of an experiment config, checked (devices against this process's)."""
  dc, cal, out, cc = config.data, config.calibration, config.output, config.coreset
  check('data.num_workers', dc.num_workers, dc.num_workers >= 0,
        '>= 0 (0: what the machine suits)')
  check('calibration.holdout', cal.holdout, 0.0 <= cal.holdout < 1.0, 'in [0, 1)')
  check('calibration.target_fpr', cal.target_fpr, 0.0 < cal.target_fpr < 1.0, 'in (0, 1)')
  check('output.num_overlays', out.num_overlays, out.num_overlays >= 0, '>= 0')
  check('devices', config.devices, config.devices >= 0, '>= 0 (0: every device)')
  local = jax.local_devices()
  if config.devices > len(local):
    raise errors.UserError(f'config.devices={config.devices} is not allowed: this process has '
                           f'{len(local)} device(s): {local}')
  devices = config.devices or len(local)
  if dc.batch_size % devices:
    raise errors.UserError(f'config.data.batch_size={dc.batch_size} is not allowed: must be a '
                           f'multiple of the {devices} devices (config.devices)')
  check('coreset.memory_budget_gb', cc.memory_budget_gb, cc.memory_budget_gb >= 0, '>= 0')
  if cc.spill_dir and not (os.path.isdir(cc.spill_dir) and os.access(cc.spill_dir, os.W_OK)):
    raise errors.UserError(f'config.coreset.spill_dir={cc.spill_dir!r}: not a writable folder')
  return RunOptions(
      seed=config.seed, num_workers=dc.num_workers, max_train_images=dc.max_train_images,
      holdout=cal.holdout, target_fpr=cal.target_fpr,
      memory_budget_bytes=int(cc.memory_budget_gb * 2**30), spill_dir=cc.spill_dir or None,
      devices=devices, progress=out.progress, num_overlays=out.num_overlays,
      save_model=out.save_model, overwrite=out.overwrite)


def read_experiment(config, workdir=None):
  """Every field of an experiment config, checked, as an `Experiment` (module docstring)."""
  data = data_spec(config, workdir)
  backbone = backbone_spec(config)
  options = run_options(config)
  return Experiment(settings=settings_from_config(config), backbone=backbone, data=data,
                    options=options)


def join_processes(config):
  """Joins the processes `config.distributed` describes (`multihost.initialize`; nothing without
  one). Must run before anything uses a JAX device."""
  if 'distributed' not in config:
    return False
  dc = config.distributed
  return multihost.initialize(dc.coordinator_address, num_processes=dc.num_processes,
                              process_id=dc.process_id, timeout_seconds=dc.timeout_seconds)


def load_backbone(spec, *, image_size):
  """`spec.load`, with weights that are not here a user error saying how to get them."""
  try:
    return spec.load(image_size=image_size)
  except FileNotFoundError as error:
    raise errors.UserError(str(error)) from error


def make_mesh(devices):
  """The mesh of `devices` of this process's devices, or None for one device."""
  return None if devices == 1 else sharded.row_mesh(devices, devices=jax.local_devices())
