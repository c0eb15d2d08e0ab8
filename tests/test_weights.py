"""Torch-free checkpoint reading and strict loading."""
import collections
import os
import pickle

import numpy as np
import pytest
import torch

from patchcore_jax.backbones import torch_pickle
from patchcore_jax.backbones import weights


def _state_dict():
  torch.manual_seed(0)
  return collections.OrderedDict([
      ('conv.weight', torch.randn(4, 3, 3, 3)),
      ('bn.weight', torch.rand(4)), ('bn.bias', torch.randn(4)),
      ('bn.running_mean', torch.randn(4)), ('bn.running_var', torch.rand(4) + 0.5),
      ('bn.num_batches_tracked', torch.tensor(7)),
      ('fc.weight', torch.randn(5, 4)), ('fc.bias', torch.randn(5)),
      ('half', torch.randn(3).half()), ('ints', torch.arange(6).reshape(2, 3)),
      ('strided', torch.randn(6, 4)[:, 1]),  # A view with storage offset and stride.
      ('transposed', torch.randn(3, 5).t()),
  ])


@pytest.mark.parametrize('zip_format', [True, False])
def test_reads_both_torch_formats(tmp_path, zip_format):
  state = _state_dict()
  path = str(tmp_path / 'ckpt.pth')
  torch.save(state, path, _use_new_zipfile_serialization=zip_format)
  loaded = torch_pickle.load_state_dict(path)
  assert list(loaded) == list(state)
  for name, tensor in state.items():
    np.testing.assert_array_equal(loaded[name], tensor.numpy())
    assert loaded[name].dtype == tensor.numpy().dtype


def test_reads_parameters_and_nested_state_dict(tmp_path):
  model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 3), torch.nn.BatchNorm2d(3))
  path = str(tmp_path / 'nested.pth')
  torch.save({'state_dict': model.state_dict()}, path)
  loaded = torch_pickle.load_state_dict(path)
  np.testing.assert_array_equal(loaded['0.weight'], model[0].weight.detach().numpy())


class _Evil:

  def __reduce__(self):
    return (os.system, ('echo pwned',))


@pytest.mark.parametrize('zip_format', [True, False])
def test_refuses_code(tmp_path, zip_format):
  path = str(tmp_path / 'evil.pth')
  torch.save({'a': torch.zeros(2), 'b': _Evil()}, path, _use_new_zipfile_serialization=zip_format)
  with pytest.raises(pickle.UnpicklingError, match='refusing to load global'):
    torch_pickle.load_state_dict(path)


def test_refuses_non_tensor_entries(tmp_path):
  path = str(tmp_path / 'list.pth')
  torch.save({'a': torch.zeros(2), 'b': 3}, path)
  with pytest.raises(pickle.UnpicklingError, match="entry 'b'"):
    torch_pickle.load_state_dict(path)


def test_torch_to_flax_layouts():
  state = {k: v.numpy() for k, v in _state_dict().items() if k.split('.')[0] in ('conv', 'bn', 'fc')}
  flat = weights.torch_to_flax(state, lambda m: m)
  np.testing.assert_array_equal(flat['params/conv/kernel'],
                                state['conv.weight'].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(flat['params/fc/kernel'], state['fc.weight'].T)
  np.testing.assert_array_equal(flat['params/bn/scale'], state['bn.weight'])
  np.testing.assert_array_equal(flat['batch_stats/bn/var'], state['bn.running_var'])
  assert sorted(flat) == ['batch_stats/bn/mean', 'batch_stats/bn/var', 'params/bn/bias',
                          'params/bn/scale', 'params/conv/kernel', 'params/fc/bias',
                          'params/fc/kernel']


def test_strict_merge_names_every_problem():
  expected = {'params/a/kernel': np.zeros((3, 3)), 'params/b/bias': np.zeros(4),
              'params/c/bias': np.zeros(2)}
  loaded = {'params/a/kernel': np.zeros((3, 2)), 'params/b/bias': np.zeros(4),
            'params/extra/bias': np.zeros(1)}
  with pytest.raises(ValueError) as err:
    weights.strict_merge(expected, loaded, source='ckpt.pth')
  text = str(err.value)
  assert 'ckpt.pth' in text and 'missing (1): params/c/bias' in text
  assert 'unexpected (1): params/extra/bias' in text
  assert 'params/a/kernel: expected (3, 3), got (3, 2)' in text
  good = weights.strict_merge(expected, {k: np.ones(v.shape) for k, v in expected.items()})
  assert good['params']['b']['bias'].shape == (4,)


def test_cached_convert_converts_once(tmp_path):
  source = tmp_path / 'w.bin'
  source.write_bytes(b'abc')
  calls = []

  def convert(path):
    calls.append(path)
    return {'params/x/kernel': np.arange(3.0)}

  for _ in range(2):
    out = weights.cached_convert(str(source), 'toy', convert, cache=str(tmp_path / 'cache'))
  assert len(calls) == 1
  np.testing.assert_array_equal(out['params/x/kernel'], np.arange(3.0))
  files = os.listdir(tmp_path / 'cache')
  assert len(files) == 1 and files[0].startswith('toy-') and files[0].endswith('.npz')


def test_fetch_verifies_the_hash_prefix_and_is_found_by_load(tmp_path):
  from patchcore_jax import backbones  # pylint: disable=g-import-not-at-top
  from patchcore_jax.backbones import fetch  # pylint: disable=g-import-not-at-top
  import hashlib  # pylint: disable=g-import-not-at-top
  from tests.fixtures.seeded_weights import seeded_state_dict  # pylint: disable=g-import-not-at-top
  fixture = np.load(os.path.join(os.path.dirname(__file__), 'fixtures', 'resnet18.npz'))
  shapes = [tuple(int(x) for x in s.split(',') if x) for s in fixture['shapes']]
  state = seeded_state_dict(list(zip(fixture['names'], shapes)))
  source = tmp_path / 'server' / 'model.pth'
  source.parent.mkdir()
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, str(source))
  digest = hashlib.sha256(source.read_bytes()).hexdigest()
  good = tmp_path / 'server' / f'resnet18-{digest[:8]}.pth'
  bad = tmp_path / 'server' / 'resnet18-00000000.pth'
  source.rename(good)
  bad.write_bytes(good.read_bytes())
  cache = str(tmp_path / 'cache')
  with pytest.raises(ValueError, match='does not start with 00000000'):
    fetch.fetch(bad.as_uri(), cache_dir=cache, progress=False)
  path = fetch.fetch(good.as_uri(), cache_dir=cache, progress=False)
  assert open(path, 'rb').read() == good.read_bytes()
  # The CLI fetches and converts; load_backbone then finds the file in the cache by itself.
  fetch.main(['resnet18', f'--cache_dir={cache}', f'--url={good.as_uri()}'])
  original = backbones.TORCHVISION_URLS['resnet18']
  backbones.TORCHVISION_URLS['resnet18'] = good.as_uri()
  try:
    bb = backbones.load_backbone('resnet18', cache_dir=cache, fold=False)
  finally:
    backbones.TORCHVISION_URLS['resnet18'] = original
  np.testing.assert_array_equal(np.asarray(bb.variables['params']['conv1']['kernel']),
                                state['conv1.weight'].transpose(2, 3, 1, 0))


class _Touch:
  """A pickle payload whose side effect is a file: it must never appear."""

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f'touch {self.marker}',))


def _legacy_records(tmp_path):
  """The five pickles and the storage bytes of a legacy-format file of one float tensor."""
  path = str(tmp_path / 'plain.pth')
  torch.save({'w': torch.arange(3, dtype=torch.float32)}, path,
             _use_new_zipfile_serialization=False)
  with open(path, 'rb') as f:
    records = [pickle.load(f) for _ in range(3)]
    start = f.tell()
    torch_pickle._RestrictedUnpicklerLegacy(f, lambda key, dtype, numel: key).load()  # pylint: disable=protected-access
    object_bytes = open(path, 'rb').read()[start:f.tell()]
    keys = pickle.load(f)
    storages = f.read()
  return records, object_bytes, keys, storages


@pytest.mark.parametrize('position', ['magic', 'protocol', 'sys_info', 'object', 'storage_keys'])
def test_legacy_format_refuses_code_in_every_pickle(tmp_path, position):
  (magic, protocol, sys_info), object_bytes, keys, storages = _legacy_records(tmp_path)
  marker = tmp_path / 'pwned'
  evil = pickle.dumps(_Touch(marker), protocol=2)
  parts = {'magic': pickle.dumps(magic, protocol=2), 'protocol': pickle.dumps(protocol, protocol=2),
           'sys_info': pickle.dumps(sys_info, protocol=2), 'object': object_bytes,
           'storage_keys': pickle.dumps(keys, protocol=2)}
  parts[position] = evil
  path = tmp_path / 'evil.pth'
  path.write_bytes(b''.join(parts.values()) + storages)
  with pytest.raises(torch_pickle.CheckpointError, match=f'{path}.*refusing to load global'):
    torch_pickle.load_state_dict(str(path))
  assert not marker.exists()


def test_zip_format_refuses_code_in_data_pkl(tmp_path):
  import zipfile  # pylint: disable=g-import-not-at-top
  marker = tmp_path / 'pwned'
  path = tmp_path / 'evil_zip.pth'
  with zipfile.ZipFile(path, 'w') as archive:
    archive.writestr('archive/data.pkl', pickle.dumps({'w': _Touch(marker)}, protocol=2))
  with pytest.raises(torch_pickle.CheckpointError, match=f'{path}.*refusing to load global'):
    torch_pickle.load_state_dict(str(path))
  assert not marker.exists()


def test_unreadable_checkpoints_name_the_file(tmp_path):
  for name, content in (('garbage.pth', b'\x00\x01 not a checkpoint'), ('empty.pth', b'')):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(torch_pickle.CheckpointError, match=f'cannot read checkpoint {path}'):
      torch_pickle.load_state_dict(str(path))
  path = str(tmp_path / 'ok.pth')
  torch.save({'w': torch.zeros(4)}, path, _use_new_zipfile_serialization=False)
  with open(path, 'rb') as f:
    data = f.read()
  with open(path, 'wb') as f:
    f.write(data[:len(data) - 6])  # Truncated inside the storage.
  with pytest.raises(torch_pickle.CheckpointError, match=str(tmp_path)):
    torch_pickle.load_state_dict(path)
