"""Reads PyTorch checkpoint files without torch.

Both formats `torch.save` has written are supported:
  * the zip format (torch >= 1.6): `archive/data.pkl` plus one raw file per storage;
  * the legacy format: magic number, protocol, sys-info and object pickles, then the storages.

Unpickling is restricted everywhere a file is read: the object pickle accepts only ordered dicts,
tensor-rebuild functions and typed storages; the legacy format's magic-number, protocol, sys-info
and storage-keys pickles accept no global at all (they hold ints, strings, dicts and lists). So a
checkpoint cannot run code. Anything else, and any unreadable file, raises `CheckpointError` (a
`pickle.UnpicklingError` and an `errors.UserError`) naming the file.
"""
import collections
import io
import pickle
import struct
import zipfile

import numpy as np

from patchcore_jax import errors

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    'FloatStorage': np.float32,
    'DoubleStorage': np.float64,
    'HalfStorage': np.float16,
    'LongStorage': np.int64,
    'IntStorage': np.int32,
    'ShortStorage': np.int16,
    'CharStorage': np.int8,
    'ByteStorage': np.uint8,
    'BoolStorage': np.bool_,
}


class _StorageType:
  """Stands in for `torch.<X>Storage` classes inside the pickle."""

  def __init__(self, name):
    self.name = name
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None):
  del requires_grad, backward_hooks, metadata
  array = storage  # A flat numpy array.
  itemsize = array.dtype.itemsize
  if len(size) == 0:
    return np.array(array[storage_offset])
  return np.lib.stride_tricks.as_strided(
      array[storage_offset:], shape=tuple(size),
      strides=tuple(s * itemsize for s in stride)).copy()


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None):
  del requires_grad, backward_hooks
  return data


_ALLOWED = {
    ('collections', 'OrderedDict'): collections.OrderedDict,
    ('torch._utils', '_rebuild_tensor_v2'): _rebuild_tensor_v2,
    ('torch._utils', '_rebuild_parameter'): _rebuild_parameter,
}


class CheckpointError(errors.UserError, pickle.UnpicklingError):
  """A checkpoint file that cannot be read, or that holds more than tensors; names the file."""


class _PlainUnpickler(pickle.Unpickler):
  """Unpickler for records of plain values: no global (so no callable) and no persistent id."""

  def find_class(self, module, name):
    raise pickle.UnpicklingError(
        f'refusing to load global {module}.{name}: this record may only hold plain values')

  def persistent_load(self, pid):
    raise pickle.UnpicklingError(f'unexpected persistent id {pid!r}')


def _plain_load(stream):
  return _PlainUnpickler(stream).load()


class _RestrictedUnpickler(pickle.Unpickler):
  """Unpickler that resolves only tensors, storages and ordered dicts."""

  def __init__(self, file, load_storage):
    super().__init__(file)
    self._load_storage = load_storage

  def find_class(self, module, name):
    if (module, name) in _ALLOWED:
      return _ALLOWED[(module, name)]
    if module == 'torch' and name in _STORAGE_DTYPES:
      return _StorageType(name)
    raise pickle.UnpicklingError(
        f'refusing to load global {module}.{name}: a checkpoint may only hold tensors and '
        'ordered dicts of tensors')

  def persistent_load(self, pid):
    if not (isinstance(pid, tuple) and pid and pid[0] == 'storage'):
      raise pickle.UnpicklingError(f'unsupported persistent id {pid!r}')
    storage_type, key, numel = pid[1], str(pid[2]), pid[4]
    if not isinstance(storage_type, _StorageType):
      raise pickle.UnpicklingError(f'unsupported storage type {storage_type!r}')
    return self._load_storage(key, storage_type.dtype, numel)


def _load_zip(path):
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pkl_names = [n for n in names if n.endswith('/data.pkl') or n == 'data.pkl']
    if len(pkl_names) != 1:
      raise ValueError(f'expected one data.pkl in the archive, found {pkl_names}')
    prefix = pkl_names[0][:-len('data.pkl')]

    def load_storage(key, dtype, numel):
      raw = archive.read(f'{prefix}data/{key}')
      return np.frombuffer(raw, dtype=dtype, count=numel)

    with archive.open(pkl_names[0]) as f:
      return _RestrictedUnpickler(io.BytesIO(f.read()), load_storage).load()


def _load_legacy(path):
  with open(path, 'rb') as f:
    stream = f
    magic = _plain_load(stream)
    if magic != _LEGACY_MAGIC:
      raise ValueError('not a PyTorch checkpoint (bad magic number)')
    _plain_load(stream)  # Protocol version.
    _plain_load(stream)  # System info (endianness, type sizes).
    storages = {}

    def load_storage(key, dtype, numel):
      if key not in storages:
        storages[key] = (dtype, numel)
      return key  # Placeholder; replaced once the raw storages are read.

    placeholders = _RestrictedUnpicklerLegacy(stream, load_storage).load()
    keys = _plain_load(stream)
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
      raise ValueError('the storage-keys record is not a list of strings')
    data = {}
    for key in keys:
      dtype, _ = storages[key]
      (numel,) = struct.unpack('<q', stream.read(8))
      data[key] = np.frombuffer(stream.read(numel * dtype.itemsize), dtype=dtype, count=numel)
  return {name: _rebuild_tensor_v2(data[key], *args) for name, (key, args) in placeholders.items()}


class _RestrictedUnpicklerLegacy(_RestrictedUnpickler):
  """Legacy files store the storages after the pickle: record rebuild calls, apply them later."""

  def find_class(self, module, name):
    if (module, name) == ('torch._utils', '_rebuild_tensor_v2'):
      return lambda key, *args: (key, args)
    if (module, name) == ('torch._utils', '_rebuild_parameter'):
      return _rebuild_parameter
    return super().find_class(module, name)


def load_state_dict(path):
  """Returns {name: np.ndarray} from a PyTorch state-dict file, without torch.

  Args:
    path: a file written by `torch.save(model.state_dict(), path)`, zip or legacy format. A dict
      holding the state dict under 'state_dict' or 'model' is accepted too.
  Raises:
    CheckpointError naming `path`: the file cannot be read, or holds anything but tensors and
    (ordered) dicts.
  """
  try:
    if zipfile.is_zipfile(path):
      obj = _load_zip(path)
    else:
      obj = _load_legacy(path)
  except (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError,
          AttributeError, struct.error, zipfile.BadZipFile, OSError) as error:
    raise CheckpointError(f'cannot read checkpoint {path}: {error}') from error
  if not isinstance(obj, dict):
    raise CheckpointError(f'{path} holds a {type(obj).__name__}, not a state dict')
  for key in ('state_dict', 'model'):
    if key in obj and isinstance(obj[key], dict):
      obj = obj[key]
  out = {}
  for name, value in obj.items():
    if not isinstance(value, np.ndarray):
      raise CheckpointError(f'{path}: entry {name!r} is a {type(value).__name__}, not a tensor')
    out[name] = value
  return out
