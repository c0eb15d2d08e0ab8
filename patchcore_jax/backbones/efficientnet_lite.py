"""EfficientNet-Lite0..4 in Flax (NHWC), the architecture of `efficientnet-lite-pytorch==0.1.0`.

Lite variants: ReLU6, no squeeze-excitation, stem and head not scaled, BatchNorm epsilon 1e-3 and
TensorFlow-style 'SAME' padding (asymmetric for even inputs). Module names mirror the torch state
dict with leading underscores dropped ('_blocks.6._bn1' -> 'blocks_6/bn1'). Stage outputs: 'stem',
'blocks.0' .. 'blocks.N' (the output of each MBConv block), 'head' and 'logits'.
"""
import functools
import math
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from patchcore_jax.backbones.layers import BatchNorm
from patchcore_jax.backbones.layers import Conv
from patchcore_jax.backbones.layers import DepthwiseConv
from patchcore_jax.backbones.layers import deepest_stage

# (repeats, kernel, stride, expand ratio, input filters, output filters), as in the TF release.
_BLOCKS = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
           (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
# name: (width coefficient, depth coefficient)
COEFFICIENTS = {'efficientnet_lite0': (1.0, 1.0), 'efficientnet_lite1': (1.0, 1.1),
                'efficientnet_lite2': (1.1, 1.2), 'efficientnet_lite3': (1.2, 1.4),
                'efficientnet_lite4': (1.4, 1.8)}

# The reference implementation's BatchNorm: epsilon 1e-3, PyTorch momentum 1 - 0.99.
BATCHNORM = functools.partial(BatchNorm, epsilon=1e-3, momentum=0.01)


def _round_filters(filters, width, divisor=8):
  filters *= width
  new = max(divisor, int(filters + divisor / 2) // divisor * divisor)
  if new < 0.9 * filters:
    new += divisor
  return int(new)


def block_specs(name):
  """[(kernel, stride, expand, in, out)] for every MBConv block of an EfficientNet-Lite."""
  width, depth = COEFFICIENTS[name]
  specs = []
  for i, (repeats, kernel, stride, expand, cin, cout) in enumerate(_BLOCKS):
    fixed = i in (0, len(_BLOCKS) - 1)  # Lite keeps the first and last stage's depth.
    cin = 32 if i == 0 else _round_filters(cin, width)
    cout = _round_filters(cout, width)
    repeats = repeats if fixed else int(math.ceil(depth * repeats))
    for j in range(repeats):
      specs.append((kernel, stride if j == 0 else 1, expand, cin if j == 0 else cout, cout))
  return tuple(specs)


def stage_strides(name):
  """{'blocks.i': stride} plus stem and head."""
  strides, s = {'stem': 2}, 2
  for i, (_, stride, _, _, _) in enumerate(block_specs(name)):
    s *= stride
    strides[f'blocks.{i}'] = s
  strides['head'] = s
  return strides


def default_stages(name):
  """The last block at stride 8 and the last at stride 16 (Lite2: 'blocks.6', 'blocks.14')."""
  strides = stage_strides(name)
  last = lambda s: max((k for k in strides if k.startswith('blocks.') and strides[k] == s),
                       key=lambda k: int(k.split('.')[1]))
  return (last(8), last(16))


class MBConv(nn.Module):
  kernel: int
  stride: int
  expand: int
  cin: int
  cout: int
  fold_bn: bool = False
  conv: str = 'auto'  # layers.CONV_IMPLS

  @nn.compact
  def __call__(self, x):
    _BatchNorm = functools.partial(BATCHNORM, folded=self.fold_bn)  # pylint: disable=invalid-name
    y = x
    mid = self.cin * self.expand
    if self.expand != 1:
      y = nn.relu6(_BatchNorm(name='bn0')(Conv(mid, (1, 1), name='expand_conv', impl=self.conv)(y)))
    y = DepthwiseConv(self.kernel, self.stride, padding='SAME', name='depthwise_conv',
                      impl=self.conv)(y)
    y = nn.relu6(_BatchNorm(name='bn1')(y))
    y = _BatchNorm(name='bn2')(Conv(self.cout, (1, 1), name='project_conv', impl=self.conv)(y))
    if self.stride == 1 and self.cin == self.cout:
      y = y + x
    return y


class EfficientNetLite(nn.Module):
  """variant: 'efficientnet_lite0'..'efficientnet_lite4'; stages: outputs to return."""
  variant: str = 'efficientnet_lite2'
  stages: Sequence[str] = ('blocks.6', 'blocks.14')
  num_classes: int = 1000
  fold_bn: bool = False  # BatchNorms only add their bias (weights from backbones.fold_batchnorm).
  conv: str = 'auto'  # layers.CONV_IMPLS: how convolutions are computed.

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, 3] normalised images -> {stage: [B, h, w, C]} ('logits': [B, classes])."""
    _BatchNorm = functools.partial(BATCHNORM, folded=self.fold_bn)  # pylint: disable=invalid-name
    specs = block_specs(self.variant)
    order = ['stem'] + [f'blocks.{i}' for i in range(len(specs))] + ['head', 'logits']
    last = deepest_stage(self.stages, order, self.variant)
    out = {}
    x = Conv(32, (3, 3), strides=(2, 2), padding='SAME', name='conv_stem', impl=self.conv)(x)
    x = out['stem'] = nn.relu6(_BatchNorm(name='bn0')(x))
    for i, spec in enumerate(specs):
      if last < i + 1:
        break
      x = out[f'blocks.{i}'] = MBConv(*spec, self.fold_bn, self.conv, name=f'blocks_{i}')(x)
    if last >= order.index('head'):
      x = Conv(1280, (1, 1), name='conv_head', impl=self.conv)(x)
      x = out['head'] = nn.relu6(_BatchNorm(name='bn1')(x))
    if last >= order.index('logits'):
      out['logits'] = nn.Dense(self.num_classes, name='fc', precision='highest')(jnp.mean(x, axis=(1, 2)))
    return {s: out[s] for s in self.stages}


def conv_of_batchnorm(path):
  """The convolution a BatchNorm normalises: 'bn0' -> 'conv_stem', 'bn1' -> 'conv_head',
  'blocks_3/bn0' -> 'blocks_3/expand_conv', .../bn1 -> depthwise_conv, .../bn2 -> project_conv."""
  head, _, leaf = path.rpartition('/')
  if not head:
    return {'bn0': 'conv_stem', 'bn1': 'conv_head'}[leaf]
  return f"{head}/{ {'bn0': 'expand_conv', 'bn1': 'depthwise_conv', 'bn2': 'project_conv'}[leaf]}"


def torch_rename(module_path):
  """'_blocks.6._bn1' -> 'blocks_6/bn1'."""
  parts = []
  for part in module_path.split('.'):
    part = part.lstrip('_')
    if part.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{part}'
    else:
      parts.append(part)
  return '/'.join(parts)
