"""Layers shared by the backbones."""
import flax.linen as nn
import jax.numpy as jnp
from jax import lax


class BatchNorm(nn.Module):
  """BatchNorm over the last axis with PyTorch's numerics and Flax's parameter names.

  Normally (variables immutable) it normalises with the running statistics: inference mode. When
  applied with `mutable=['batch_stats']` it takes one PyTorch training-mode step instead: it
  normalises with the batch's (biased) statistics and moves the running mean and the *unbiased*
  running variance towards them by `momentum` (PyTorch's convention: the new value's weight).
  That step exists only to reproduce the official implementation (`backbones.official_bn_probe`).

  Variables: params/scale, params/bias, batch_stats/mean, batch_stats/var.
  """
  epsilon: float = 1e-5
  momentum: float = 0.1

  @nn.compact
  def __call__(self, x):
    c = x.shape[-1]
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    mean = self.variable('batch_stats', 'mean', jnp.zeros, (c,), jnp.float32)
    var = self.variable('batch_stats', 'var', jnp.ones, (c,), jnp.float32)
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


def deepest_stage(stages, order, model_name):
  """Index in `order` of the deepest requested stage; ValueError naming any unknown stage."""
  unknown = set(stages) - set(order)
  if unknown:
    raise ValueError(f'unknown {model_name} stages {sorted(unknown)}; known: {tuple(order)}')
  return max(order.index(s) for s in stages)
