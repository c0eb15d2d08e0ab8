"""torchvision's ResNet family in Flax (NHWC, inference-mode BatchNorm).

Module names mirror torchvision's parameter names ('layer1.0.downsample.1' -> 'layer1_0/downsample_1'),
so torchvision state dicts convert by renaming alone. `__call__` returns a dict of the stage outputs
named in `stages` ('stem', 'layer1'..'layer4', 'logits') and stops after the deepest one.
"""
import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from patchcore_jax.backbones.layers import BatchNorm as _BatchNorm
from patchcore_jax.backbones.layers import Conv
from patchcore_jax.backbones.layers import deepest_stage

STAGES = ('stem', 'layer1', 'layer2', 'layer3', 'layer4', 'logits')
STRIDES = {'stem': 4, 'layer1': 4, 'layer2': 8, 'layer3': 16, 'layer4': 32}



def _conv(features, kernel, stride=1, groups=1, name=None, impl='auto'):
  pad = (kernel - 1) // 2
  return Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
              feature_group_count=groups, name=name, impl=impl)


class BasicBlock(nn.Module):
  planes: int
  stride: int = 1
  downsample: bool = False
  groups: int = 1
  base_width: int = 64
  fold_bn: bool = False
  conv: str = 'auto'  # layers.CONV_IMPLS
  expansion = 1

  @nn.compact
  def __call__(self, x):
    BatchNorm = functools.partial(_BatchNorm, folded=self.fold_bn)  # pylint: disable=invalid-name
    identity = x
    y = nn.relu(BatchNorm(name='bn1')(
        _conv(self.planes, 3, self.stride, name='conv1', impl=self.conv)(x)))
    y = BatchNorm(name='bn2')(_conv(self.planes, 3, name='conv2', impl=self.conv)(y))
    if self.downsample:
      identity = BatchNorm(name='downsample_1')(
          _conv(self.planes, 1, self.stride, name='downsample_0', impl=self.conv)(x))
    return nn.relu(y + identity)


class Bottleneck(nn.Module):
  """torchvision's Bottleneck (ResNet v1.5: the stride sits on the 3x3 convolution)."""
  planes: int
  stride: int = 1
  downsample: bool = False
  groups: int = 1
  base_width: int = 64
  fold_bn: bool = False
  conv: str = 'auto'  # layers.CONV_IMPLS
  expansion = 4

  @nn.compact
  def __call__(self, x):
    BatchNorm = functools.partial(_BatchNorm, folded=self.fold_bn)  # pylint: disable=invalid-name
    width = int(self.planes * (self.base_width / 64.0)) * self.groups
    identity = x
    y = nn.relu(BatchNorm(name='bn1')(_conv(width, 1, name='conv1', impl=self.conv)(x)))
    y = nn.relu(BatchNorm(name='bn2')(
        _conv(width, 3, self.stride, self.groups, name='conv2', impl=self.conv)(y)))
    y = BatchNorm(name='bn3')(_conv(self.planes * 4, 1, name='conv3', impl=self.conv)(y))
    if self.downsample:
      identity = BatchNorm(name='downsample_1')(
          _conv(self.planes * 4, 1, self.stride, name='downsample_0', impl=self.conv)(x))
    return nn.relu(y + identity)


class ResNet(nn.Module):
  """ResNet with torchvision's architecture.

  Attributes:
    block: BasicBlock or Bottleneck.
    layers: blocks per stage, e.g. (3, 4, 6, 3).
    groups, width_per_group: ResNeXt / Wide ResNet knobs (torchvision's names).
    stages: names of the stage outputs to return; the forward pass stops after the deepest.
    num_classes: size of the classifier head ('logits').
    fold_bn: BatchNorms only add their bias (weights from `backbones.fold_batchnorm`).
    conv: how convolutions are computed (`layers.CONV_IMPLS`).
  """
  block: type
  layers: Sequence[int]
  groups: int = 1
  width_per_group: int = 64
  stages: Sequence[str] = ('layer2', 'layer3')
  num_classes: int = 1000
  fold_bn: bool = False
  conv: str = 'auto'  # layers.CONV_IMPLS: how convolutions are computed.

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, 3] normalised images -> {stage: [B, h, w, C]} ('logits': [B, num_classes])."""
    BatchNorm = functools.partial(_BatchNorm, folded=self.fold_bn)  # pylint: disable=invalid-name
    last = deepest_stage(self.stages, STAGES, 'ResNet')
    out = {}
    x = nn.relu(BatchNorm(name='bn1')(
        Conv(64, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)), name='conv1',
             impl=self.conv)(x)))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    out['stem'] = x
    in_planes = 64
    for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), self.layers)):
      if last < i + 1:
        break
      stride = 1 if i == 0 else 2
      for j in range(blocks):
        needs_downsample = j == 0 and (stride != 1 or in_planes != planes * self.block.expansion)
        x = self.block(planes, stride if j == 0 else 1, needs_downsample, self.groups,
                       self.width_per_group, self.fold_bn, self.conv,
                       name=f'layer{i + 1}_{j}')(x)
        in_planes = planes * self.block.expansion
      out[f'layer{i + 1}'] = x
    if last == STAGES.index('logits'):
      out['logits'] = nn.Dense(self.num_classes, name='fc', precision='highest')(jnp.mean(x, axis=(1, 2)))
    return {s: out[s] for s in self.stages}


ARCHS = {
    'resnet18': dict(block=BasicBlock, layers=(2, 2, 2, 2)),
    'resnet34': dict(block=BasicBlock, layers=(3, 4, 6, 3)),
    'resnet50': dict(block=Bottleneck, layers=(3, 4, 6, 3)),
    'resnet101': dict(block=Bottleneck, layers=(3, 4, 23, 3)),
    'resnet152': dict(block=Bottleneck, layers=(3, 8, 36, 3)),
    'wide_resnet50_2': dict(block=Bottleneck, layers=(3, 4, 6, 3), width_per_group=128),
    'wide_resnet101_2': dict(block=Bottleneck, layers=(3, 4, 23, 3), width_per_group=128),
    'resnext50_32x4d': dict(block=Bottleneck, layers=(3, 4, 6, 3), groups=32, width_per_group=4),
    'resnext101_32x8d': dict(block=Bottleneck, layers=(3, 4, 23, 3), groups=32, width_per_group=8),
}


def conv_of_batchnorm(path):
  """The convolution a BatchNorm normalises: 'layer1_0/bn2' -> 'layer1_0/conv2',
  'layer2_0/downsample_1' -> 'layer2_0/downsample_0', 'bn1' -> 'conv1'."""
  head, _, leaf = path.rpartition('/')
  conv = 'downsample_0' if leaf == 'downsample_1' else leaf.replace('bn', 'conv')
  return f'{head}/{conv}' if head else conv


def torch_rename(module_path):
  """'layer1.0.downsample.0' -> 'layer1_0/downsample_0'."""
  parts = []
  for part in module_path.split('.'):
    if part.isdigit() and parts:
      parts[-1] = f'{parts[-1]}_{part}'
    else:
      parts.append(part)
  return '/'.join(parts)
