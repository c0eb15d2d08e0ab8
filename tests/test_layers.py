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
    (3, 1, ((1, 1), (1, 1)), 1, True),    # Winograd path (9x7 grid, odd on both axes)
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
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('kernel,stride,padding', [
    (3, 2, 'SAME'),            # EfficientNet-Lite's stem (asymmetric on even inputs)
    (3, 2, ((1, 1), (1, 1))),  # MobileNetV2's stem
    (2, 2, 'VALID'),
    (3, 2, ((2, 0), (0, 1))),  # uneven explicit padding
])
@pytest.mark.parametrize('size', [(10, 8), (9, 7)])
def test_few_input_channels_take_the_shifted_path(kernel, stride, padding, size):
  """Strided convolutions of RGB inputs (kh * kw * 3 <= SHIFTED_MAX_TAPS): shifted
  multiply-adds, no lax convolution, the same outputs and parameter tree as nn.Conv; stride 1
  (VGG's first convolution) keeps the lax convolution."""
  x = jax.random.normal(jax.random.key(2), (2, *size, 3))
  kw = dict(strides=(stride, stride), padding=padding, use_bias=True)
  ours, ref = layers.Conv(5, (kernel, kernel), **kw), nn.Conv(5, (kernel, kernel), precision='highest', **kw)
  params = jax.tree_util.tree_map(lambda p: p + 0.5 if p.ndim == 1 else p,
                                  ref.init(jax.random.key(3), x))
  got, want = ours.apply(params, x), ref.apply(params, x)
  assert got.shape == want.shape
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert 'conv_general_dilated' not in _jaxpr_text(ours, x)
  assert 'conv_general_dilated' in _jaxpr_text(
      layers.Conv(5, (kernel, kernel), padding=padding, winograd=False), x)


@pytest.mark.parametrize('tile', [2, 4])
@pytest.mark.parametrize('shape', [(2, 8, 8, 5), (1, 9, 7, 3), (3, 14, 14, 16), (1, 1, 1, 2), (1, 2, 5, 4)])
def test_winograd_conv3x3_matches_lax_conv(shape, tile):
  """F(2x2, 3x3) and F(4x4, 3x3) against the direct convolution (float64 reference), grids
  the tile divides and grids it does not."""
  kx, kk = jax.random.split(jax.random.key(sum(shape)))
  x = jax.random.normal(kx, shape)
  kernel = jax.random.normal(kk, (3, 3, shape[-1], 7)) / np.sqrt(9 * shape[-1])
  got = layers.winograd_conv3x3(x, kernel, tile=tile)
  want = jax.lax.conv_general_dilated(
      np.asarray(x, np.float64), np.asarray(kernel, np.float64), (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), precision=jax.lax.Precision.HIGHEST)
  assert got.shape == want.shape
  scale = float(np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=0, atol=(2e-6 if tile == 2 else 1e-5) * scale)


@pytest.mark.parametrize('tile', [2, 4])
def test_winograd_kernel_is_g_kernel_gt(tile):
  """The elementwise kernel transform against G g G^T in float64 (Lavin & Gray's matrices)."""
  kernel = np.asarray(jax.random.normal(jax.random.key(tile), (3, 3, 5, 6)))
  g = layers._WINOGRAD[tile][1]
  want = np.einsum('ai,ijco,bj->abco', g, kernel.astype(np.float64), g).reshape(-1, 5, 6)
  got = layers.winograd_kernel(jnp.asarray(kernel), tile=tile)
  assert got.shape == ((tile + 2) ** 2, 5, 6)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())


def _jaxpr_text(module, x):
  """The jaxpr's text (nested jaxprs included), to look for primitive names in."""
  params = module.init(jax.random.key(0), x)
  return str(jax.make_jaxpr(module.apply)(params, x))


def test_conv_takes_winograd_path_only_where_it_should():
  """3x3/stride 1/pad 1 on a grid up to WINOGRAD_MAX_PIXELS: no lax convolution is left."""
  conv = 'conv_general_dilated'
  small = jnp.zeros((1, 8, 8, 4))
  side = int(np.sqrt(layers.WINOGRAD_MAX_PIXELS)) + 1
  large = jnp.zeros((1, side, side, 4))
  pad = ((1, 1), (1, 1))
  assert conv not in _jaxpr_text(layers.Conv(4, (3, 3), padding=pad), small)
  assert conv in _jaxpr_text(layers.Conv(4, (3, 3), padding=pad, winograd=False), small)
  assert conv in _jaxpr_text(layers.Conv(4, (3, 3), padding=pad), large)
  assert conv in _jaxpr_text(layers.Conv(4, (3, 3), strides=(2, 2), padding=pad), small)
  assert conv in _jaxpr_text(layers.Conv(4, (3, 3), padding='SAME'), small)
  assert conv in _jaxpr_text(layers.Conv(4, (3, 3), padding=pad, feature_group_count=2), small)
