"""Layers shared by the backbones."""
from typing import Any, Sequence, Tuple, Union

import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class Conv(nn.Module):
  """A 2-D convolution with `nn.Conv`'s parameters ('kernel' [kh, kw, in, out], optional 'bias').

  1x1 convolutions are computed as a plain matrix product over the channels (after subsampling
  for a stride): XLA's CPU convolution reaches about half the throughput of its matmul on the
  1x1 shapes of a ResNet bottleneck, the dot about 160-210 GFLOP/s on a 2-core AVX-512 CPU.
  Everything else is `lax.conv_general_dilated`. Grouped 1x1 convolutions use the general path.

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) or 'SAME' / 'VALID'.
    feature_group_count: groups (ResNeXt).
    use_bias: add a bias.
  """
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Union[str, Sequence[Tuple[int, int]]] = ((0, 0), (0, 0))
  feature_group_count: int = 1
  use_bias: bool = False
  precision: Any = lax.Precision.HIGHEST

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, C] -> [B, H', W', features]."""
    kh, kw = self.kernel_size
    cin = x.shape[-1] // self.feature_group_count
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, cin, self.features),
                        jnp.float32)
    # A 1x1 kernel under 'SAME' pads nothing, as under 'VALID'.
    unpadded = self.padding in ('SAME', 'VALID') or all(p == (0, 0) for p in map(tuple, self.padding))
    if (kh, kw) == (1, 1) and self.feature_group_count == 1 and unpadded:
      sh, sw = self.strides
      y = jnp.einsum('bhwc,cd->bhwd', x[:, ::sh, ::sw], kernel[0, 0], precision=self.precision)
    else:
      y = lax.conv_general_dilated(x, kernel, self.strides, self.padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=self.feature_group_count,
                                   precision=self.precision)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return y


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's numerics and Flax's parameter names.

  Normally (variables immutable) it normalises with the running statistics: inference mode. When
  applied with `mutable=['batch_stats']` it takes one PyTorch training-mode step instead: it
  normalises with the batch's (biased) statistics and moves the running mean and the *unbiased*
  running variance towards them by `momentum` (PyTorch's convention: the new value's weight).
  That step exists only to reproduce the official implementation (`backbones.official_bn_probe`).
  With `folded=True` (inference only) it adds `bias` and nothing else: `backbones.fold_batchnorm`
  has multiplied the normalisation into the preceding convolution and the shift into `bias`.

  Variables: params/scale, params/bias, batch_stats/mean, batch_stats/var (also when folded, so
  the variable tree does not change).
  """
  epsilon: float = 1e-5
  momentum: float = 0.1
  folded: bool = False

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
    if self.folded:
      if self.is_mutable_collection('batch_stats') and not self.is_initializing():
        raise ValueError('a folded BatchNorm has no training mode; fold after the BN probe')
      return x + bias
    if self.is_mutable_collection('batch_stats') and not self.is_initializing():
      axes = tuple(range(x.ndim - 1))
      n = x.size // c
      batch_mean = jnp.mean(x, axis=axes)
      batch_var = jnp.mean(jnp.square(x - batch_mean), axis=axes)
      mean.value = (1 - self.momentum) * mean.value + self.momentum * batch_mean
      var.value = (1 - self.momentum) * var.value + self.momentum * batch_var * n / max(n - 1, 1)
      use_mean, use_var = batch_mean, batch_var
    else:
      use_mean, use_var = mean.value, var.value
    return (x - use_mean) * (scale * lax.rsqrt(use_var + self.epsilon)) + bias


def same_pads(size, kernel, stride):
  """TensorFlow 'SAME' padding (before, after) of one spatial axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv(nn.Module):
  """Depthwise convolution as k*k shifted multiply-adds.

  Same parameters as `Conv(C, (k, k), feature_group_count=C)` (kernel [k, k, 1, C]) and the
  same result, but XLA's CPU backend runs grouped convolutions 10-50x slower than this form.
  padding: 'SAME' (TensorFlow's, asymmetric for even inputs) or p (p zeros on every side, torch).
  """
  kernel_size: int
  stride: int = 1
  padding: Union[str, int] = 'SAME'

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.stride
    c = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
    if self.padding == 'SAME':
      (top, bottom), (left, right) = same_pads(x.shape[1], k, s), same_pads(x.shape[2], k, s)
    else:
      top = bottom = left = right = int(self.padding)
    out_h = (x.shape[1] + top + bottom - k) // s + 1
    out_w = (x.shape[2] + left + right - k) // s + 1
    x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
    out = None
    for i in range(k):
      for j in range(k):
        tap = x[:, i:i + s * (out_h - 1) + 1:s, j:j + s * (out_w - 1) + 1:s, :] * kernel[i, j, 0]
        out = tap if out is None else out + tap
    return out


def deepest_stage(stages, order, model_name):
  """Index in `order` of the deepest requested stage; ValueError naming any unknown stage."""
  unknown = set(stages) - set(order)
  if unknown:
    raise ValueError(f'unknown {model_name} stages {sorted(unknown)}; known: {tuple(order)}')
  return max(order.index(s) for s in stages)
