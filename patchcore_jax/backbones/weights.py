"""Weight conversion, the flat `.npz` cache and strict loading.

Flax variables are nested dicts such as {'params': {'conv1': {'kernel': ...}}, 'batch_stats': ...}.
On disk they are flat `.npz` files keyed by '/'-joined paths ('params/conv1/kernel'), loaded with
`allow_pickle=False`.
"""
import hashlib
import os

import jax
import numpy as np


def flatten(tree, prefix=''):
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for key, value in tree.items():
    path = f'{prefix}/{key}' if prefix else str(key)
    if isinstance(value, dict) or hasattr(value, 'items'):
      out.update(flatten(value, path))
    else:
      out[path] = value
  return out


def unflatten(flat):
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree = {}
  for path, value in flat.items():
    node = tree
    *parents, leaf = path.split('/')
    for part in parents:
      node = node.setdefault(part, {})
    node[leaf] = value
  return tree


def strict_merge(expected, loaded, *, source=''):
  """Checks `loaded` against `expected` shapes and returns it as a nested variables dict.

  Args:
    expected: flat {path: ShapeDtypeStruct or array}, e.g. from `jax.eval_shape(model.init, ...)`.
    loaded: flat {path: np.ndarray}.
    source: where `loaded` came from, for the error message.
  Raises:
    ValueError naming every missing key, every unexpected key and every shape mismatch.
  """
  missing = sorted(set(expected) - set(loaded))
  unexpected = sorted(set(loaded) - set(expected))
  mismatched = sorted(
      f'{k}: expected {tuple(expected[k].shape)}, got {tuple(loaded[k].shape)}'
      for k in set(expected) & set(loaded) if tuple(expected[k].shape) != tuple(loaded[k].shape))
  if missing or unexpected or mismatched:
    lines = [f'weights from {source or "<arrays>"} do not fit the model:']
    if missing:
      lines.append(f'  missing ({len(missing)}): ' + ', '.join(missing))
    if unexpected:
      lines.append(f'  unexpected ({len(unexpected)}): ' + ', '.join(unexpected))
    if mismatched:
      lines.append(f'  shape mismatch ({len(mismatched)}): ' + '; '.join(mismatched))
    raise ValueError('\n'.join(lines))
  return unflatten({k: np.asarray(v, dtype=expected[k].dtype) for k, v in loaded.items()})


def expected_shapes(model, input_shape=(1, 64, 64, 3)):
  """Flat {path: ShapeDtypeStruct} of a Flax model's variables, without allocating them."""
  shapes = jax.eval_shape(model.init, jax.random.key(0), jax.numpy.zeros(input_shape))
  return flatten(shapes)


def torch_to_flax(state_dict, rename):
  """Converts a torch state dict to flat Flax variables.

  conv weight OIHW -> kernel HWIO; linear weight [out, in] -> kernel [in, out];
  BatchNorm weight/bias/running_mean/running_var -> params scale/bias, batch_stats mean/var;
  `num_batches_tracked` is dropped.

  Args:
    state_dict: {torch name: np.ndarray}.
    rename: maps a torch module path ('layer1.0.conv1') to the Flax module path ('layer1_0/conv1').
  """
  bn_modules = {k[:-len('.running_mean')] for k in state_dict if k.endswith('.running_mean')}
  out = {}
  for name, value in state_dict.items():
    module, _, leaf = name.rpartition('.')
    path = rename(module)
    if leaf == 'num_batches_tracked':
      continue
    if module in bn_modules:
      key = {'weight': 'params/{}/scale', 'bias': 'params/{}/bias',
             'running_mean': 'batch_stats/{}/mean', 'running_var': 'batch_stats/{}/var'}[leaf]
      out[key.format(path)] = value
    elif leaf == 'weight' and value.ndim == 4:
      out[f'params/{path}/kernel'] = np.transpose(value, (2, 3, 1, 0))
    elif leaf == 'weight' and value.ndim == 2:
      out[f'params/{path}/kernel'] = value.T
    elif leaf == 'bias':
      out[f'params/{path}/bias'] = value
    else:
      raise ValueError(f'cannot convert torch parameter {name} of shape {value.shape}')
  return out


def variables_sha256(variables):
  """sha256 hex digest of a variables tree: every leaf's path, dtype, shape and bytes, in path
  order. Identifies weights independently of the file they came from."""
  digest = hashlib.sha256()
  for path, value in sorted(flatten(variables).items()):
    value = np.ascontiguousarray(np.asarray(value))
    digest.update(f'{path}:{value.dtype.str}:{value.shape};'.encode())
    digest.update(value.reshape(-1).view(np.uint8).data)
  return digest.hexdigest()


def file_sha256(path, chunk=1 << 20):
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(chunk), b''):
      digest.update(block)
  return digest.hexdigest()


def cache_dir(override=''):
  """Directory of converted `.npz` weights: `override`, $PATCHCORE_JAX_CACHE or ~/.cache/patchcore_jax."""
  path = override or os.environ.get('PATCHCORE_JAX_CACHE') or os.path.join(
      os.path.expanduser('~'), '.cache', 'patchcore_jax')
  os.makedirs(path, exist_ok=True)
  return path


def cached_convert(source_path, name, convert, *, cache=''):
  """Converts `source_path` once with `convert(path) -> flat dict` and caches it as `.npz`.

  The cache file name holds the first 16 hex digits of the source file's sha256, so a changed
  source file is converted again.
  """
  digest = file_sha256(source_path)[:16]
  target = os.path.join(cache_dir(cache), f'{name}-{digest}.npz')
  if not os.path.exists(target):
    flat = convert(source_path)
    tmp = f'{target}.{os.getpid()}.tmp.npz'  # Unique: parallel processes may convert at once.
    np.savez(tmp, **flat)
    os.replace(tmp, target)
  with np.load(target, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}
