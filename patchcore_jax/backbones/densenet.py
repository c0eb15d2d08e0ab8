"""torchvision's DenseNet-201 in Flax (NHWC, inference-mode BatchNorm).

Module names are torchvision's parameter paths with '.' -> '_' ('features.denseblock1.denselayer1.
norm1' -> 'features_denseblock1_denselayer1_norm1'). Stage outputs, named as torchvision modules:
'features.denseblock1'..'features.denseblock4', 'features.transition1'..'features.transition3'
(after their average pooling), 'features.norm5' and 'logits'; the forward pass stops after the
deepest one asked for.
"""
import re
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from patchcore_jax.backbones.layers import BatchNorm
from patchcore_jax.backbones.layers import Conv
from patchcore_jax.backbones.layers import deepest_stage

ARCHS = {'densenet201': dict(growth_rate=32, block_config=(6, 12, 48, 32), num_init_features=64)}
STAGES = ('features.denseblock1', 'features.transition1', 'features.denseblock2',
          'features.transition2', 'features.denseblock3', 'features.transition3',
          'features.denseblock4', 'features.norm5', 'logits')
STRIDES = {'features.denseblock1': 4, 'features.transition1': 8, 'features.denseblock2': 8,
           'features.transition2': 16, 'features.denseblock3': 16, 'features.transition3': 32,
           'features.denseblock4': 32, 'features.norm5': 32}


def _conv(features, kernel, name, impl='auto'):
  pad = (kernel - 1) // 2
  return Conv(features, (kernel, kernel), padding=((pad, pad), (pad, pad)), name=name, impl=impl)


class DenseNet(nn.Module):
  growth_rate: int = 32
  block_config: Sequence[int] = (6, 12, 48, 32)
  num_init_features: int = 64
  bn_size: int = 4
  stages: Sequence[str] = ('features.denseblock2', 'features.denseblock3')
  num_classes: int = 1000
  conv: str = 'auto'  # layers.CONV_IMPLS: how convolutions are computed.

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, 3] normalised images -> {stage: [B, h, w, C]} ('logits': [B, classes])."""
    last = deepest_stage(self.stages, STAGES, 'DenseNet')
    out = {}
    x = Conv(self.num_init_features, (7, 7), strides=(2, 2), padding=((3, 3), (3, 3)),
             name='features_conv0', impl=self.conv)(x)
    x = nn.relu(BatchNorm(name='features_norm0')(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for b, num_layers in enumerate(self.block_config):
      block = f'features_denseblock{b + 1}'
      for i in range(num_layers):
        layer = f'{block}_denselayer{i + 1}'
        y = nn.relu(BatchNorm(name=f'{layer}_norm1')(x))
        y = _conv(self.bn_size * self.growth_rate, 1, f'{layer}_conv1', self.conv)(y)
        y = nn.relu(BatchNorm(name=f'{layer}_norm2')(y))
        y = _conv(self.growth_rate, 3, f'{layer}_conv2', self.conv)(y)
        x = jnp.concatenate([x, y], axis=-1)
      out[f'features.denseblock{b + 1}'] = x
      if last <= STAGES.index(f'features.denseblock{b + 1}'):
        break
      if b + 1 < len(self.block_config):
        name = f'features_transition{b + 1}'
        x = nn.relu(BatchNorm(name=f'{name}_norm')(x))
        x = _conv(x.shape[-1] // 2, 1, f'{name}_conv', self.conv)(x)
        x = nn.avg_pool(x, (2, 2), strides=(2, 2))
        out[f'features.transition{b + 1}'] = x
        if last <= STAGES.index(f'features.transition{b + 1}'):
          break
    if last >= STAGES.index('features.norm5'):
      x = out['features.norm5'] = BatchNorm(name='features_norm5')(x)
    if last >= STAGES.index('logits'):
      out['logits'] = nn.Dense(self.num_classes, name='classifier', precision='highest')(jnp.mean(nn.relu(x), axis=(1, 2)))
    return {s: out[s] for s in self.stages}


def torch_rename(module_path):
  """'features.denseblock1.denselayer1.norm1' -> 'features_denseblock1_denselayer1_norm1'.

  torchvision's published file uses older names ('...denselayer1.norm.1'), renamed as torchvision's
  own loader does.
  """
  module_path = re.sub(r'(denselayer\d+\.(?:norm|relu|conv))\.([12])$', r'\1\2', module_path)
  return module_path.replace('.', '_')
