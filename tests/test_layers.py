"""Shared backbone layers against Flax/lax references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax.backbones import layers


@pytest.mark.parametrize('kernel,stride,padding,groups,bias', [
    (1, 1, ((0, 0), (0, 0)), 1, False),   # pointwise: a matrix product
    (1, 2, ((0, 0), (0, 0)), 1, True),    # strided pointwise (ResNet downsample)
    (1, 1, 'SAME', 1, False),
    (1, 2, 'VALID', 1, False),
    (1, 1, ((0, 0), (0, 0)), 2, False),   # grouped pointwise takes the general path
    (1, 1, ((1, 1), (1, 1)), 1, False),   # padded 1x1 takes the general path
    (3, 2, ((1, 1), (1, 1)), 2, False),
    (3, 1, 'SAME', 1, True),
])
def test_conv_matches_flax_conv(kernel, stride, padding, groups, bias):
  """Same parameter tree as nn.Conv and the same outputs, odd sizes included."""
  x = jax.random.normal(jax.random.key(0), (2, 9, 7, 4))
  kw = dict(strides=(stride, stride), padding=padding, feature_group_count=groups, use_bias=bias)
  ours = layers.Conv(6, (kernel, kernel), **kw)
  ref = nn.Conv(6, (kernel, kernel), precision='highest', **kw)
  params = ref.init(jax.random.key(1), x)
  if bias:  # Non-zero bias so that adding it is checked.
    params = jax.tree_util.tree_map(lambda p: p + 0.5 if p.ndim == 1 else p, params)
  assert (jax.tree_util.tree_map(jnp.shape, ours.init(jax.random.key(1), x)) ==
          jax.tree_util.tree_map(jnp.shape, params))
  got, want = ours.apply(params, x), ref.apply(params, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
