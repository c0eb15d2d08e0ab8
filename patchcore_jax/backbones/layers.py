"""Layers shared by the backbones."""
from typing import Any, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Winograd F(m x m, 3x3) (Lavin & Gray, 2016): Y = A^T [(G g G^T) * (B^T d B)] A per (m+2)^2 input
# tile d and m x m output tile: (m+2)^2 products where the direct form needs 9 m^2.
# {m: (B^T [m+2, m+2], G [m+2, 3], A^T [m, m+2])}
_WINOGRAD = {
    2: (np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]]),
        np.array([[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]]),
        np.array([[1, 1, 1, 0], [0, 1, -1, -1]])),
    4: (np.array([[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                  [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]),
        np.array([[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
                  [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]),
        np.array([[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0],
                  [0, 1, -1, 8, -8, 1]])),
}

# Largest input grid (H * W) on which `Conv` takes the Winograd path. Measured on a 2-core AVX-512
# CPU, batch 8, 224 px, direct vs Winograd up to 56x56 (ms/img, median of 8 interleaved calls):
# WideResNet-50-2 to layer3 115.5 vs 108.7, VGG16 196 vs 162, DenseNet-201 75 vs 67, ResNet-18
# 24.5 vs 19.2. Alone, a 56x56x128 convolution is slower as Winograd (the tile transforms are
# memory-bound), but inside a network they fuse with the neighbouring bias and ReLU. Once the
# kernel transform stopped being an einsum (`_winograd_planes`), VGG16's 112x112 grid paid: 133
# vs 142 ms/img (median of 6 interleaved calls; with 224x224 as well, no clear difference). No
# other backbone has a stride-1 3x3 convolution on a grid above 56x56.
WINOGRAD_MAX_PIXELS = 112 * 112


def winograd_kernel(kernel, *, tile=2):
  """G g G^T: [3, 3, I, O] -> [(tile + 2)^2, I, O], the transformed kernel."""
  return jnp.stack(_winograd_planes(kernel, tile=tile))


def _winograd_planes(kernel, *, tile=2):
  """The (tile + 2)^2 planes [I, O] of G g G^T, row-major.

  One product of the fixed [(tile + 2)^2, 9] matrix kron(G, G) with the kernel's nine [I * O]
  slices. As an einsum over G twice, the transform ran at a small fraction of memory speed (234
  ms per call for VGG16's kernels, ~25 ms per image in batches of 8, repaid on every forward
  pass); as elementwise adds of the slices it was fast but made compilation 2.5x slower.
  """
  g = _WINOGRAD[tile][1].astype(np.float32)
  i, o = kernel.shape[2:]
  u = jnp.dot(jnp.asarray(np.kron(g, g)), kernel.reshape(9, i * o).astype(jnp.float32),
              precision=lax.Precision.HIGHEST).astype(kernel.dtype)  # In float32, then rounded.
  return [u[p].reshape(i, o) for p in range(u.shape[0])]


def _combine(matrix, operands):
  """[sum_i matrix[r, i] * operands[i] for every row r], skipping zeros and unit factors."""
  out = []
  for row in matrix:
    acc = None
    for coef, op in zip(row, operands):
      if coef == 0:
        continue
      term = op if coef == 1 else -op if coef == -1 else np.float32(coef) * op
      acc = term if acc is None else acc + term
    out.append(acc)
  return out


def winograd_conv3x3(x, kernel, *, tile=2, precision=lax.Precision.HIGHEST):
  """A 3x3, stride-1, pad-1 convolution computed with Winograd F(tile x tile, 3x3).

  The same result as `lax.conv_general_dilated(x, kernel, (1, 1), ((1, 1), (1, 1)))` up to float
  rounding (relative error ~1e-6 for tile 2, a few 1e-6 for tile 4), with 2.25x (tile 2) or 4x
  (tile 4) fewer multiplications: the input is cut into overlapping (tile+2)^2 tiles (stride
  tile), each tile transformed by B^T d B, the transformed planes multiplied by the planes of the
  transformed kernel (one matmul over the channels each), and each product brought back to a
  tile x tile output tile by A^T m A. Grids that tile does not divide are padded and cropped.

  Args:
    x: [B, H, W, I].
    kernel: [3, 3, I, O] (HWIO).
    tile: output tile size m, 2 or 4. `Conv` uses 2: with 4 on the 28x28 and 14x14 grids,
      WideResNet-50-2 to layer3 took 143-157 ms/img against 117 (more planes to transform).
    precision: of the channel matmuls.

  Returns:
    [B, H, W, O].
  """
  bt, _, at = _WINOGRAD[tile]
  n = tile + 2
  b, h, w, c = x.shape
  th, tw = -(-h // tile), -(-w // tile)
  hp, wp = (th + 1) * tile, (tw + 1) * tile
  xp = jnp.pad(x, ((0, 0), (1, hp - 1 - h), (1, wp - 1 - w), (0, 0)))
  # Row tile * t + i of the padded input is [t + i // tile, i % tile] after this reshape.
  xp = xp.reshape(b, th + 1, tile, tw + 1, tile, c)
  v = []
  for r in _combine(bt, [xp[:, i // tile:i // tile + th, i % tile] for i in range(n)]):
    v.extend(_combine(bt, [r[:, :, j // tile:j // tile + tw, j % tile] for j in range(n)]))
  u = _winograd_planes(kernel, tile=tile)
  # Separate dots, not one batched dot over a stacked [n * n, ...] array: stacking the
  # transformed planes is a slow concatenation on XLA's CPU backend.
  m = [jnp.dot(vi.reshape(-1, c).astype(u[i].dtype), u[i], precision=precision,
               preferred_element_type=jnp.float32).reshape(b, th, tw, -1)
       for i, vi in enumerate(v)]
  rows = [_combine(at, m[n * a:n * a + n]) for a in range(n)]
  # y[q][p]: output pixel (tile * t + p, tile * s + q).
  y = [_combine(at, [rows[a][q] for a in range(n)]) for q in range(tile)]
  y = jnp.stack([jnp.stack(yq) for yq in y], axis=1)  # [p, q, B, th, tw, O]
  y = jnp.transpose(y, (2, 3, 0, 4, 1, 5)).reshape(b, tile * th, tile * tw, -1)
  return y[:, :h, :w]


# Largest kh * kw * input channels for which a strided `Conv` sums shifted copies of the input
# instead of calling XLA's convolution, which is slow on so few input channels. Measured on a
# 2-core AVX-512 CPU, batch 8, 224 px (ms/img, direct vs shifted, median of 8 interleaved calls):
# EfficientNet-Lite's 3x3 stride-2 stem 1.23 vs 0.52, MobileNetV2's 1.69 vs 0.60; ResNet's 7x7
# stride-2 stem (147 taps) 2.9 vs 7.0, so it stays direct. VGG16's stride-1 first convolution was
# faster alone (12.2 vs 8.0, and to relu1_2 39 vs 34) but the network to relu2_2 slower (72 vs
# 110: XLA scheduled the following layers differently), so stride-1 convolutions stay direct.
SHIFTED_MAX_TAPS = 27


def shifted_conv(x, kernel, strides, padding):
  """An ungrouped convolution as a sum of kh * kw * I shifted, strided slices of the input, each
  times one kernel row [O]: the same result as `lax.conv_general_dilated` up to float rounding
  (summation order). Fast where I is small (XLA fuses the sum into one pass over the output).

  Args:
    x: [B, H, W, I].
    kernel: [kh, kw, I, O] (HWIO).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) or 'SAME' / 'VALID' (lax's meaning).
  Returns:
    [B, H', W', O].
  """
  cin = kernel.shape[2]
  out = None
  for i, j, window in _shifted_windows(x, kernel.shape[:2], strides, padding, materialise=True):
    for c in range(cin):
      tap = window[..., c:c + 1] * kernel[i, j, c]
      out = tap if out is None else out + tap
  return out


def _shifted_windows(x, kernel_size, strides, padding, *, materialise=False):
  """Yields (i, j, x's padded window under kernel tap (i, j)) [B, H', W', C] for the taps of a
  kh x kw convolution with `strides` and `padding` (((top, bottom), (left, right)) or 'SAME' /
  'VALID', lax's meaning): what `shifted_conv` and `DepthwiseConv` sum. With `materialise`, the
  padded input is computed once (`shifted_conv`: fused into its kh * kw * I taps, the input's
  producer, e.g. the normalisation, would be recomputed for every one)."""
  (kh, kw), (sh, sw) = kernel_size, strides
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(x.shape[1:3], (kh, kw), (sh, sw), padding)
  (top, bottom), (left, right) = padding
  out_h = (x.shape[1] + top + bottom - kh) // sh + 1
  out_w = (x.shape[2] + left + right - kw) // sw + 1
  x = jnp.pad(x, ((0, 0), (top, bottom), (left, right), (0, 0)))
  if materialise:
    x = lax.optimization_barrier(x)
  for i in range(kh):
    for j in range(kw):
      yield i, j, x[:, i:i + sh * (out_h - 1) + 1:sh, j:j + sw * (out_w - 1) + 1:sw]


# How convolutions are computed: 'tuned' (the CPU-measured paths below: 1x1 as matmuls, shifted
# sums, Winograd, depthwise as shifted multiply-adds), 'xla' (lax.conv_general_dilated for every
# one: cuDNN on GPUs), 'auto' (tuned on the CPU, xla elsewhere). Same results to float32 rounding.
CONV_IMPLS = ('auto', 'tuned', 'xla')


def resolve_conv(impl, backend=None):
  """'tuned' or 'xla' for `impl` (see CONV_IMPLS) on `backend` (default: JAX's)."""
  if impl not in CONV_IMPLS:
    raise ValueError(f'convolution implementation must be one of {CONV_IMPLS}, got {impl!r}')
  if impl != 'auto':
    return impl
  return 'tuned' if (backend or jax.default_backend()) == 'cpu' else 'xla'


class Conv(nn.Module):
  """A 2-D convolution with `nn.Conv`'s parameters ('kernel' [kh, kw, in, out], optional 'bias').

  1x1 convolutions are computed as a plain matrix product over the channels (after subsampling
  for a stride): XLA's CPU convolution reaches about half the throughput of its matmul on the
  1x1 shapes of a ResNet bottleneck, the dot about 160-210 GFLOP/s on a 2-core AVX-512 CPU.
  Strided ungrouped convolutions with at most `SHIFTED_MAX_TAPS` kernel taps times input
  channels (the RGB stems of EfficientNet-Lite and MobileNetV2) use `shifted_conv`.
  3x3 stride-1 pad-1 ungrouped convolutions on grids of at most `WINOGRAD_MAX_PIXELS` use
  `winograd_conv3x3` (where it measured faster) unless `winograd=False`. Everything else is
  `lax.conv_general_dilated`. Grouped 1x1 convolutions use the general path.

  Mixed precision (`backbones.apply_model`): the products take their operands in the kernel's
  dtype (a bfloat16 kernel: bfloat16 operands) and accumulate in float32; the output has x's
  dtype (bfloat16 activations where the caller passes them, float32 otherwise).

  Attributes:
    features: output channels.
    kernel_size: (kh, kw).
    strides: (sh, sw).
    padding: ((top, bottom), (left, right)) or 'SAME' / 'VALID'.
    feature_group_count: groups (ResNeXt).
    use_bias: add a bias.
    winograd: allow the Winograd path.
    impl: 'auto', 'tuned' (the paths above) or 'xla' (always `lax.conv_general_dilated`).
  """
  features: int
  kernel_size: Tuple[int, int]
  strides: Tuple[int, int] = (1, 1)
  padding: Union[str, Sequence[Tuple[int, int]]] = ((0, 0), (0, 0))
  feature_group_count: int = 1
  use_bias: bool = False
  precision: Any = lax.Precision.HIGHEST
  winograd: bool = True
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    """x: [B, H, W, C] -> [B, H', W', features]."""
    kh, kw = self.kernel_size
    cin = x.shape[-1] // self.feature_group_count
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (kh, kw, cin, self.features),
                        jnp.float32)
    tuned = resolve_conv(self.impl) == 'tuned'
    # A 1x1 kernel under 'SAME' pads nothing, as under 'VALID'.
    unpadded = self.padding in ('SAME', 'VALID') or all(p == (0, 0) for p in map(tuple, self.padding))
    if not tuned:
      y = lax.conv_general_dilated(x.astype(kernel.dtype), kernel, self.strides, self.padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=self.feature_group_count,
                                   precision=self.precision, preferred_element_type=jnp.float32)
    elif (kh, kw) == (1, 1) and self.feature_group_count == 1 and unpadded:
      sh, sw = self.strides
      y = jnp.einsum('bhwc,cd->bhwd', x[:, ::sh, ::sw].astype(kernel.dtype), kernel[0, 0],
                     precision=self.precision, preferred_element_type=jnp.float32)
    elif (self.feature_group_count == 1 and kh * kw * cin <= SHIFTED_MAX_TAPS
          and tuple(self.strides) != (1, 1)):
      y = shifted_conv(x, kernel, tuple(self.strides), self.padding)
    elif (self.winograd and (kh, kw) == (3, 3) and tuple(self.strides) == (1, 1)
          and self.feature_group_count == 1 and not isinstance(self.padding, str)
          and all(tuple(p) == (1, 1) for p in self.padding)
          and x.shape[1] * x.shape[2] <= WINOGRAD_MAX_PIXELS):
      y = winograd_conv3x3(x, kernel, precision=self.precision)
    else:
      y = lax.conv_general_dilated(x.astype(kernel.dtype), kernel, self.strides, self.padding,
                                   dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
                                   feature_group_count=self.feature_group_count,
                                   precision=self.precision, preferred_element_type=jnp.float32)
    y = y.astype(x.dtype)
    if self.use_bias:
      y = y + self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32).astype(
          x.dtype)
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


class DepthwiseConv(nn.Module):
  """Depthwise convolution as k*k shifted multiply-adds.

  Same parameters as `Conv(C, (k, k), feature_group_count=C)` (kernel [k, k, 1, C]) and the
  same result, but XLA's CPU backend runs grouped convolutions 10-50x slower than this form.
  padding: 'SAME' (TensorFlow's, asymmetric for even inputs) or p (p zeros on every side, torch).
  impl: 'auto', 'tuned' (this form) or 'xla' (the grouped `lax.conv_general_dilated`).
  """
  kernel_size: int
  stride: int = 1
  padding: Union[str, int] = 'SAME'
  impl: str = 'auto'

  @nn.compact
  def __call__(self, x):
    k, s = self.kernel_size, self.stride
    c = x.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (k, k, 1, c), jnp.float32)
    pads = 'SAME' if self.padding == 'SAME' else ((int(self.padding),) * 2,) * 2
    if resolve_conv(self.impl) == 'xla':
      return lax.conv_general_dilated(
          x.astype(kernel.dtype), kernel, (s, s), pads, dimension_numbers=('NHWC', 'HWIO', 'NHWC'),
          feature_group_count=c, precision=lax.Precision.HIGHEST,
          preferred_element_type=jnp.float32).astype(x.dtype)
    out = None
    for i, j, window in _shifted_windows(x, (k, k), (s, s), pads):
      tap = window * kernel[i, j, 0]
      out = tap if out is None else out + tap
    return out.astype(x.dtype)


def deepest_stage(stages, order, model_name):
  """Index in `order` of the deepest requested stage; ValueError naming any unknown stage."""
  unknown = set(stages) - set(order)
  if unknown:
    raise ValueError(f'unknown {model_name} stages {sorted(unknown)}; known: {tuple(order)}')
  return max(order.index(s) for s in stages)
