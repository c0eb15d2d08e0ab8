"""Locally aware patch features, with the official PatchCore implementation's semantics.

Pipeline for one batch (all pure functions, jit-friendly):
  images [B, H, W, 3] in [0, 1] -> `normalize` -> backbone -> {stage: [B, h_i, w_i, C_i]}
  -> `patch_features`: per stage a p x p neighbourhood (zero padding (p-1)//2) flattened in torch
     `Unfold` order (channel-major) -> adaptive average pooling to `pretrain_dim` -> bilinear resize
     (align_corners=False) to the first stage's grid -> concatenated and pooled to `target_dim`.
  -> [B, h_0, w_0, target_dim].
Pooling along channels and resizing along space are linear maps on different axes, so they commute;
pooling first keeps the deeper stage's 9*C-wide vectors off the larger grid.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def normalize(images, *, mean=IMAGENET_MEAN, std=IMAGENET_STD):
  """images: [..., 3] in [0, 1] -> ImageNet-normalised float32."""
  return (images.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def interpolation_matrix(in_size, out_size):
  """[out_size, in_size] float32 matrix of 1-D linear interpolation, align_corners=False.

  Matches `torch.nn.functional.interpolate(mode='bilinear', align_corners=False)` without
  antialiasing: source = (dst + 0.5) * in/out - 0.5, clamped at 0; the right neighbour is clamped
  to the last index.
  """
  scale = in_size / out_size
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  matrix = np.zeros((out_size, in_size), np.float64)
  np.add.at(matrix, (np.arange(out_size), lo), 1.0 - frac)
  np.add.at(matrix, (np.arange(out_size), hi), frac)
  return matrix.astype(np.float32)


def resize_bilinear(x, size):
  """x: [B, h, w, C] -> [B, H, W, C], bilinear with align_corners=False (no antialiasing)."""
  height, width = size
  if x.shape[1:3] == (height, width):
    return x
  rows = jnp.asarray(interpolation_matrix(x.shape[1], height))
  cols = jnp.asarray(interpolation_matrix(x.shape[2], width))
  x = jnp.einsum('Hh,bhwc->bHwc', rows, x, precision=lax.Precision.HIGHEST)
  return jnp.einsum('Ww,bHwc->bHWc', cols, x, precision=lax.Precision.HIGHEST)


def preprocess(images, *, image_size, resize=None):
  """Images already in memory -> network input, on the device.

  Args:
    images: [B, H, W, 3] uint8 (0..255) or float in [0, 1].
    image_size: side of the square output.
    resize: if given, the shorter side is resized to `resize` and the centre `image_size` square
      cropped (the official 'resize 256, crop 224'); if None, a straight resize to image_size.
  Returns:
    [B, image_size, image_size, 3] ImageNet-normalised float32.

  The resize is bilinear without antialiasing, as `torch.nn.functional.interpolate(...,
  antialias=False)` on tensors. The file pipeline (`data.transforms`) resizes with PIL on the host
  instead, as the official code does on PIL images; the two differ when shrinking.
  """
  x = images.astype(jnp.float32)
  if images.dtype == jnp.uint8:
    x = x / 255.0
  h, w = x.shape[1:3]
  if resize is None:
    return normalize(resize_bilinear(x, (image_size, image_size)))
  new_h, new_w = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
  x = resize_bilinear(x, (new_h, new_w))
  top, left = int(round((new_h - image_size) / 2.0)), int(round((new_w - image_size) / 2.0))
  return normalize(x[:, top:top + image_size, left:left + image_size])


def patchify(x, *, patch_size=3, stride=1):
  """Neighbourhoods of every location, as torch's `Unfold` lays them out.

  Args:
    x: [B, h, w, C] feature map.
    patch_size: neighbourhood size p (zero padding (p - 1) // 2).
    stride: step between neighbourhood centres.
  Returns:
    [B, h', w', C * p * p], the last axis ordered (channel, row offset, column offset) with the
    channel slowest, where h' = (h + 2 * pad - p) // stride + 1 (likewise w').
  """
  pad = (patch_size - 1) // 2
  b, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (h + 2 * pad - patch_size) // stride + 1
  out_w = (w + 2 * pad - patch_size) // stride + 1
  shifted = [
      x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]
      for i in range(patch_size) for j in range(patch_size)
  ]
  # [B, h', w', C, p*p] -> [B, h', w', C*p*p] (channel-major, as torch Unfold).
  return jnp.stack(shifted, axis=-1).reshape(b, out_h, out_w, c * patch_size * patch_size)


def adaptive_pool_bins(length, out_size):
  """PyTorch adaptive-pooling bins: start = floor(i*L/out), end = ceil((i+1)*L/out).

  Returns:
    (index [out_size, width] int32, weight [out_size, width] float32): bin i averages
    x[index[i, j]] with weights weight[i, j] (1/bin size, 0 for padding).
  """
  i = np.arange(out_size)
  start = (i * length) // out_size
  end = -((-(i + 1) * length) // out_size)
  width = int((end - start).max())
  offsets = np.arange(width)
  index = np.minimum(start[:, None] + offsets[None], length - 1)
  valid = offsets[None] < (end - start)[:, None]
  weight = valid / (end - start)[:, None]
  return index.astype(np.int32), weight.astype(np.float32)


def adaptive_avg_pool_1d(x, out_size):
  """x: [..., L] -> [..., out_size], as `torch.nn.functional.adaptive_avg_pool1d`.

  With out_size > L bins overlap and values repeat, as in the official code.
  """
  length = x.shape[-1]
  if length == out_size:
    return x
  if length % out_size == 0:  # Equal, disjoint bins: a reshape and a mean.
    return x.reshape(*x.shape[:-1], out_size, length // out_size).mean(axis=-1)
  index, weight = adaptive_pool_bins(length, out_size)
  return jnp.sum(x[..., index] * weight, axis=-1)


def patch_features(stage_maps, *, patch_size=3, stride=1, pretrain_dim=1024, target_dim=1024):
  """Locally aware patch features from backbone stage outputs.

  Args:
    stage_maps: sequence of [B, h_i, w_i, C_i]; the first sets the patch grid.
    patch_size, stride: neighbourhood aggregation (official: 3 and 1).
    pretrain_dim: per-stage adaptive-pooling length (official `pretrain_embed_dimension`).
    target_dim: final adaptive-pooling length (official `target_embed_dimension`).
  Returns:
    [B, H, W, target_dim] float32, (H, W) the first stage's patch grid.
  """
  if not stage_maps:
    raise ValueError('patch_features needs at least one stage output')
  pooled = []
  grid = None
  for x in stage_maps:
    patches = patchify(x, patch_size=patch_size, stride=stride)  # [B, h, w, C*p*p]
    patches = adaptive_avg_pool_1d(patches, pretrain_dim)  # [B, h, w, pretrain_dim]
    grid = grid or patches.shape[1:3]
    pooled.append(resize_bilinear(patches, grid))  # [B, H, W, pretrain_dim]
  # Official: stack -> [N, stages, pretrain_dim] -> flatten -> pool to target_dim.
  stacked = jnp.concatenate(pooled, axis=-1)
  return adaptive_avg_pool_1d(stacked, target_dim)


def embed(backbone_apply, variables, images, *, stages, patch_size=3, stride=1,
          pretrain_dim=1024, target_dim=1024):
  """images [B, H, W, 3] in [0, 1] -> patch features [B, h, w, target_dim].

  `backbone_apply(variables, normalised_images)` must return {stage: [B, h, w, C]}.
  """
  maps = backbone_apply(variables, normalize(images))
  return patch_features([maps[s] for s in stages], patch_size=patch_size, stride=stride,
                        pretrain_dim=pretrain_dim, target_dim=target_dim)


def make_embed_fn(backbone, *, patch_size=3, stride=1, pretrain_dim=1024, target_dim=1024):
  """A jitted `images [B, H, W, 3] -> [B, h, w, target_dim]` for a `backbones.Backbone`."""
  fn = jax.jit(functools.partial(
      embed, backbone.model.apply, stages=backbone.stages, patch_size=patch_size, stride=stride,
      pretrain_dim=pretrain_dim, target_dim=target_dim))
  return functools.partial(fn, backbone.variables)
