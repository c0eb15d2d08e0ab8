"""Export of a fitted model's whole predict function for deployment without this package.

`export(model, directory, batch_size=8)` writes
  predict.jaxexport      the serialized `jax.export` program: uint8 images [B, S, S, 3] and the
                         parameters -> image scores [B], maps [B, S, S], patch scores [B, h, w]
                         (backbone, patch features, kNN search and maps, all in one program);
  params.npz             its parameters: the backbone's weights and the memory bank (bfloat16
                         screening arrays stored as their uint16 bits), read without pickle;
  export.json            batch size, preprocessing, threshold, the model's identity;
  patchcore_exported.py  a loader that needs only jax and numpy (`exported_runtime`).
The batch size is fixed; the loader pads the last batch. The program is lowered for `platforms`
(default: this machine's backend); lowering for 'cuda' as well lets a CPU machine export for GPUs.
"""
import json
import os
import shutil

import jax
import jax.numpy as jnp
from jax import export as jax_export
import numpy as np

from patchcore_jax import exported_runtime
from patchcore_jax import files
from patchcore_jax import stages


def _storable(leaf):
  """(numpy array npz can hold, whether it was bfloat16)."""
  if leaf.dtype == jnp.bfloat16:
    return np.asarray(jax.lax.bitcast_convert_type(leaf, jnp.uint16)), True
  return np.asarray(leaf), False


def export(model, directory, *, batch_size=None, platforms=None):
  """Writes `model`'s predict function as a `jax.export` artifact (see the module docstring).

  Args:
    model: a `model.PatchCore`.
    directory: output directory (replaced if it exists).
    batch_size: images per call (default: the model's batch size).
    platforms: e.g. ('cpu', 'cuda'); default: the current backend.
  Returns:
    `directory`.
  """
  settings = model.settings
  batch_size = batch_size or settings.batch_size
  leaves, treedef = jax.tree_util.tree_flatten((model.backbone.variables, model.bank))
  stored = [_storable(x) for x in leaves]
  is_bf16 = tuple(flag for _, flag in stored)
  predict = stages.predict_fn(model.backbone, settings)

  def fn(params, images):
    params = [jax.lax.bitcast_convert_type(p, jnp.bfloat16) if flag else p
              for p, flag in zip(params, is_bf16)]
    variables, bank = jax.tree_util.tree_unflatten(treedef, params)
    return predict(variables, bank, images.astype(jnp.float32) / 255.0)

  size = settings.image_size
  specs = ([jax.ShapeDtypeStruct(a.shape, a.dtype) for a, _ in stored],
           jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.uint8))
  exported = jax_export.export(jax.jit(fn), platforms=platforms)(*specs)
  with files.atomic_directory(os.path.abspath(directory)) as tmp:
    with open(os.path.join(tmp, 'predict.jaxexport'), 'wb') as f:
      f.write(exported.serialize())
    np.savez(os.path.join(tmp, 'params.npz'), **{f'p{i:05d}': a for i, (a, _) in enumerate(stored)})
    meta = {
        'batch_size': batch_size,
        'num_params': len(stored),
        'platforms': list(exported.platforms),
        'preprocessing': settings.image_config,
        'image_threshold': model.calibration.image_threshold,
        'image_threshold_source': model.calibration.image_threshold_source,
        'pixel_threshold': model.calibration.pixel_threshold,
        'backbone': {'name': model.backbone.name, 'stages': list(model.backbone.stages),
                     'weights_sha256': model.backbone.weights_sha256},
        'memory_bank_size': model.bank.size,
        'library_version': model.version,
        'jax_version': jax.__version__,
        'outputs': ['scores [B]', 'maps [B, S, S]', 'patch_scores [B, h, w]'],
    }
    with open(os.path.join(tmp, 'export.json'), 'w') as f:
      json.dump(meta, f, indent=2)
    shutil.copy(exported_runtime.__file__, os.path.join(tmp, 'patchcore_exported.py'))
  return os.path.abspath(directory)
