"""Saving and loading fitted models: `save(model, directory)`, `load(directory)`.

A model directory holds
  model.json   format and library version, creation time, every setting, the calibration, the
               fit's facts, the backbone's identity (name, stages, sha256 of its weights as
               loaded, the weights file it came from, probe passes, BatchNorm folding) and the
               sha256 of every array file;
  bank.npz     the memory bank, `features` [M, D] float32;
  backbone.npz only with `save(..., include_backbone=True)`: the backbone's weights as loaded
               (flat '/'-joined keys), for machines that cannot fetch them.
Arrays are read with `allow_pickle=False`. Without backbone.npz the backbone is loaded again by
name (from the recorded file, `checkpoint=` or an installed package) and must hash to the
recorded sha256. `load` refuses, naming the file, a missing file, a checksum mismatch
(truncated or edited), a newer format version and a backbone whose weights differ.
Directories are written under a temporary name and renamed into place, so a reader never sees a
half-written model.
"""
import json
import os

import jax
import numpy as np

from patchcore_jax import backbones as backbones_lib
from patchcore_jax import errors
from patchcore_jax import files
from patchcore_jax import knn
from patchcore_jax import memory_bank
from patchcore_jax import model as model_lib
from patchcore_jax.backbones import weights as weights_lib
from patchcore_jax.version import __version__

FORMAT = 'patchcore-jax-model'
FORMAT_VERSION = 1
_BANK = 'bank.npz'
_BACKBONE = 'backbone.npz'
MODEL_FILE = 'model.json'


def _unfolded_variables(backbone):
  """The weights as loaded: a folded or probed backbone cannot be saved this way."""
  if backbone.folded or backbone.bn_probe_passes:
    raise ValueError('include_backbone needs the weights as loaded; this backbone was folded or '
                     'probed (pass the backbone as loaded, load_backbone(..., fold=False), as '
                     '`backbone=`)')
  return weights_lib.flatten(jax.tree_util.tree_map(np.asarray, backbone.variables))


def save(model, directory, *, include_backbone=False, backbone=None, overwrite=True):
  """Writes `model` to `directory` (see the module docstring).

  Args:
    model: a `model.PatchCore`.
    directory: the model directory to write.
    include_backbone: also store the backbone's weights (as loaded) in backbone.npz, so that
      `load` needs no weights file. They must hash to the model's recorded sha256.
    backbone: with include_backbone, the unfolded, unprobed backbone (when `model.backbone` was
      folded or probed); default `model.backbone`.
    overwrite: replace an existing model directory.
  Returns:
    `directory`.
  """
  directory = os.path.abspath(directory)
  if os.path.exists(directory) and not overwrite:
    raise errors.UserError(f'{directory} exists (pass overwrite=True to replace it)')
  with files.atomic_directory(directory) as tmp:
    np.savez(os.path.join(tmp, _BANK), features=memory_bank.bank_rows(model.bank))
    arrays = {_BANK: weights_lib.file_sha256(os.path.join(tmp, _BANK))}
    if include_backbone:
      flat = _unfolded_variables(backbone or model.backbone)
      if weights_lib.variables_sha256(weights_lib.unflatten(flat)) != model.backbone.weights_sha256:
        raise ValueError('the backbone given to save() is not the one the model was fitted with')
      np.savez(os.path.join(tmp, _BACKBONE), **flat)
      arrays[_BACKBONE] = weights_lib.file_sha256(os.path.join(tmp, _BACKBONE))
    bb = model.backbone
    record = {
        'format': FORMAT,
        'format_version': FORMAT_VERSION,
        'library_version': model.version,
        'saved_by': __version__,
        'backbone': {
            'name': bb.name, 'stages': list(bb.stages), 'weights_sha256': bb.weights_sha256,
            'checkpoint': bb.checkpoint, 'random_seed': bb.random_seed,
            'bn_probe_passes': bb.bn_probe_passes, 'fold_batchnorm': bb.folded,
            'dtype': bb.dtype,
        },
        'settings': {f: getattr(model.settings, f) for f in model.settings.__dataclass_fields__},
        'calibration': model.calibration.to_dict(),
        'info': dict(model.info),
        'memory_bank_size': model.bank.size,
        'arrays': arrays,
    }
    with open(os.path.join(tmp, MODEL_FILE), 'w') as f:
      json.dump(record, f, indent=2)
  return directory


def read_record(directory):
  """model.json of a model directory, checked for format and version (errors.UserError)."""
  path = os.path.join(directory, MODEL_FILE)
  if not os.path.isdir(directory):
    raise errors.UserError(f'no model directory at {directory}')
  if not os.path.isfile(path):
    raise errors.UserError(f'{path} is missing: {directory} is not a saved model')
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as error:
    raise errors.UserError(f'cannot read {path}: {error}') from error
  if not isinstance(record, dict) or record.get('format') != FORMAT:
    raise errors.UserError(f'{path} is not a patchcore-jax model file')
  version = record.get('format_version')
  if not isinstance(version, int) or version > FORMAT_VERSION:
    raise errors.UserError(
        f'{path} has format version {version!r}; this library (version {__version__}) reads '
        f'versions up to {FORMAT_VERSION}: upgrade patchcore-jax to load it')
  return record


def _read_arrays(directory, name, expected_sha256):
  path = os.path.join(directory, name)
  if not os.path.isfile(path):
    raise errors.UserError(f'{path} is missing')
  digest = weights_lib.file_sha256(path)
  if digest != expected_sha256:
    raise errors.UserError(f'{path} does not match the checksum recorded in model.json '
                           f'(truncated or edited): sha256 {digest}, expected {expected_sha256}')
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except (OSError, ValueError) as error:
    raise errors.UserError(f'cannot read {path}: {error}') from error


def _load_backbone(directory, record, *, checkpoint, cache_dir):
  spec = record['backbone']
  name, stages, expected = spec['name'], tuple(spec['stages']), spec['weights_sha256']
  if _BACKBONE in record['arrays']:
    flat = _read_arrays(directory, _BACKBONE, record['arrays'][_BACKBONE])
    model, strides = backbones_lib.build_model(name, stages)
    expected_shapes = weights_lib.expected_shapes(model)
    variables = weights_lib.strict_merge(expected_shapes, {k: flat[k] for k in expected_shapes},
                                         source=os.path.join(directory, _BACKBONE))
    backbone = backbones_lib.Backbone(name, model, jax.tree_util.tree_map(np.asarray, variables),
                                      stages, strides, weights_lib.variables_sha256(variables),
                                      checkpoint=os.path.join(directory, _BACKBONE))
    source = os.path.join(directory, _BACKBONE)
  else:
    checkpoint = checkpoint or spec.get('checkpoint') or ''
    seed = spec.get('random_seed')
    try:
      backbone = backbones_lib.load_backbone(name, stages=stages, checkpoint=checkpoint,
                                             cache_dir=cache_dir, random_seed=seed, fold=False)
    except FileNotFoundError as error:
      raise errors.UserError(
          f'{os.path.join(directory, MODEL_FILE)} needs the {name} weights with sha256 {expected}: '
          f'{error}') from error
    source = checkpoint or ('random weights, seed %s' % seed if seed is not None else name)
  if backbone.weights_sha256 != expected:
    raise errors.UserError(
        f'{os.path.join(directory, MODEL_FILE)} was fitted with {name} weights of sha256 {expected}, '
        f'but {source} has sha256 {backbone.weights_sha256}: scores would not be comparable. '
        'Pass the original weights file (checkpoint=...), or refit.')
  dtype = spec.get('dtype', 'float32')
  if dtype not in backbones_lib.DTYPES:
    raise errors.UserError(f'{os.path.join(directory, MODEL_FILE)}: backbone dtype {dtype!r} is '
                           f'not one of {backbones_lib.DTYPES}')
  backbone = backbones_lib.prepare(backbone, image_size=record['settings']['image_size'],
                                   probe_passes=spec.get('bn_probe_passes', 0),
                                   fold=bool(spec.get('fold_batchnorm')))
  return backbones_lib.with_dtype(backbone, dtype)


def load(directory, *, checkpoint='', cache_dir=''):
  """Reads a model written by `save`.

  Args:
    directory: the model directory.
    checkpoint: the backbone's weights file, when the recorded one has moved (not needed for
      weights from installed packages or with backbone.npz).
    cache_dir: where converted backbone weights are cached.
  Returns:
    A `model.PatchCore`, ready for `predict`.
  Raises:
    errors.UserError naming the file, for everything a user can fix.
  """
  directory = os.path.abspath(directory)
  record = read_record(directory)
  arrays = record.get('arrays', {})
  if _BANK not in arrays:
    raise errors.UserError(f'{os.path.join(directory, MODEL_FILE)} lists no {_BANK}')
  features = _read_arrays(directory, _BANK, arrays[_BANK]).get('features')
  if features is None or features.ndim != 2 or features.dtype != np.float32:
    raise errors.UserError(f'{os.path.join(directory, _BANK)} holds no float32 [M, D] features')
  try:
    settings = model_lib.Settings(**record['settings'])
    calibration = model_lib.Calibration.from_dict(record.get('calibration', {}))
  except (TypeError, KeyError) as error:
    raise errors.UserError(f'{os.path.join(directory, MODEL_FILE)}: bad settings ({error})') from error
  backbone = _load_backbone(directory, record, checkpoint=checkpoint, cache_dir=cache_dir)
  bank = knn.prepare_bank(features, block_size=settings.block_size, screen=settings.screen)
  return model_lib.PatchCore(backbone=backbone, bank=bank, settings=settings,
                             calibration=calibration,
                             info=tuple(sorted(record.get('info', {}).items())),
                             version=record.get('library_version', ''))
