"""Locally aware patch features, with the official PatchCore implementation's semantics.

Pipeline for one batch (all pure functions, jit-friendly):
  images [B, H, W, 3] in [0, 1] -> `normalize` -> backbone -> {stage: [B, h_i, w_i, C_i]}
  -> `patch_features`: per stage a p x p neighbourhood (zero padding (p-1)//2) flattened in torch
     `Unfold` order (channel-major) -> adaptive average pooling to `pretrain_dim` -> bilinear resize
     (align_corners=False) to the first stage's grid -> concatenated and pooled to `target_dim`.
  -> [B, h_0, w_0, target_dim].

`unfold_patch_features` builds exactly that (the reference). `patch_features` computes the same
linear map without the unfolded [B, h, w, 9 C] copy: every pooled entry is the mean of some
channels' sums over parts of their p x p window (`pooling_plan`), so each stage needs only a few
shifted adds of its map; channel pooling commutes with the spatial resize, so the final pooling
of a stage's bins is folded into that stage's plan before its resize (`stage_plans`). At
WideResNet-50 shapes (28x28x512 + 14x14x1024, 2-core CPU) that is ~3 ms per image against 57 ms
for the unfold-and-gather version it replaced; equal to float32 rounding (tests).
"""
import collections
import functools

import jax
import jax.numpy as jnp
from jax import lax
import numpy as np

from patchcore_jax import backbones as backbones_lib

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


def _interpolation_taps(in_size, out_size):
  """(lo, hi, frac) of 1-D linear interpolation, as `interpolation_matrix`: output i is
  (1 - frac[i]) * x[lo[i]] + frac[i] * x[hi[i]]."""
  src = np.maximum((np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5, 0.0)
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  return lo, hi, (src - lo).astype(np.float32)


def _resize_axis(x, axis, out_size):
  """Linear interpolation of x along `axis` to out_size (two taps per output, gathered as whole
  slices: XLA's CPU dot with the [out, in] matrix runs far slower on these shapes)."""
  lo, hi, frac = _interpolation_taps(x.shape[axis], out_size)
  shape = [1] * x.ndim
  shape[axis] = out_size
  frac = jnp.asarray(frac).reshape(shape)
  return (jnp.take(x, jnp.asarray(lo), axis=axis) * (1.0 - frac)
          + jnp.take(x, jnp.asarray(hi), axis=axis) * frac)


def resize_bilinear(x, size):
  """x: [B, h, w, C] -> [B, H, W, C], bilinear with align_corners=False (no antialiasing)."""
  height, width = size
  if x.shape[1:3] == (height, width):
    return x
  if x.shape[1] != height:
    x = _resize_axis(x, 1, height)
  if x.shape[2] != width:
    x = _resize_axis(x, 2, width)
  return x


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


def _bin_edges(length, out_size):
  """PyTorch adaptive-pooling bin edges: (start [out], end [out]), bin i = [start_i, end_i)."""
  i = np.arange(out_size)
  return (i * length) // out_size, -((-(i + 1) * length) // out_size)


def adaptive_pool_bins(length, out_size):
  """PyTorch adaptive-pooling bins: start = floor(i*L/out), end = ceil((i+1)*L/out).

  Returns:
    (index [out_size, width] int32, weight [out_size, width] float32): bin i averages
    x[index[i, j]] with weights weight[i, j] (1/bin size, 0 for padding).
  """
  start, end = _bin_edges(length, out_size)
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
  return _weighted_take(x, index, weight)


def pooling_plan(channels, patch_size, out_size):
  """How adaptive average pooling of unfolded neighbourhoods decomposes into box sums.

  The unfolded vector of one location has L = channels * P entries, P = patch_size ** 2, entry
  k = c * P + o holding channel c at window offset o (torch `Unfold` order). Adaptive pooling to
  `out_size` bins averages entries [start_i, end_i) (`adaptive_pool_bins`). Each bin is cut at
  channel boundaries into segments (c, lo, hi): channel c summed over the offsets lo..hi-1 of its
  window, a box sum that never needs the unfolded vector.

  Returns:
    ranges: the distinct (lo, hi) offset ranges, R of them.
    index: [out_size, T] int32 into the stack of box sums laid out [C, R] (entry c * R + r).
    weight: [out_size, T] float32, 1 / bin length (0 for padding entries), T the most segments
      in one bin.
  """
  p2 = patch_size * patch_size
  length = channels * p2
  starts, ends = _bin_edges(length, out_size)
  segments = []
  for start, end in zip(starts, ends):
    bin_segments = []
    for c in range(start // p2, (end - 1) // p2 + 1):
      bin_segments.append((c, max(start - c * p2, 0), min(end - c * p2, p2)))
    segments.append((bin_segments, 1.0 / (end - start)))
  ranges = sorted({(lo, hi) for bin_segments, _ in segments for _, lo, hi in bin_segments})
  slot = {r: j for j, r in enumerate(ranges)}
  width = max(len(s) for s, _ in segments)
  index = np.zeros((out_size, width), np.int32)
  weight = np.zeros((out_size, width), np.float32)
  for b, (bin_segments, w) in enumerate(segments):
    for t, (c, lo, hi) in enumerate(bin_segments):
      index[b, t] = c * len(ranges) + slot[(lo, hi)]
      weight[b, t] = w
  return tuple(ranges), index, weight


def _weighted_take(x, index, weight):
  """x [..., K] -> [..., out]: sum_t x[..., index[:, t]] * weight[:, t] (static index, weight).

  Common layouts need no gather: when the flattened index is 0..out*T-1 (bins are consecutive,
  equal-sized groups of x) it is a reshape and a weighted sum; otherwise T gathers of `out`
  entries. (Gathering [..., out, T] at once, fused with the unfolding, as the literal construction
  does, took 50 ms per image at WideResNet-50 shapes.)
  """
  out, width = index.shape
  if np.array_equal(index.reshape(-1), np.arange(out * width)) and x.shape[-1] == out * width:
    grouped = x.reshape(*x.shape[:-1], out, width)
    # A sum of strided slices: XLA's CPU reduce over a short minor axis is not vectorised (5x
    # slower here).
    if np.all(weight == weight[:1, :1]):  # One bin length: sum, then one multiply.
      return sum(grouped[..., t] for t in range(width)) * jnp.float32(weight[0, 0])
    return sum(grouped[..., t] * jnp.asarray(weight[:, t]) for t in range(width))
  total = None
  for t in range(width):
    term = jnp.take(x, jnp.asarray(index[:, t]), axis=-1) * jnp.asarray(weight[:, t])
    total = term if total is None else total + term
  return total


def _window_sums(x, ranges, *, patch_size, stride, range_major=False):
  """x [B, h, w, C] -> [B, h', w', C * R]: for every (lo, hi) in `ranges`, the sum of the
  zero-padded map's neighbourhood entries at window offsets lo..hi-1 (row-major in the p x p
  window), stacked as entry c * R + r (or r * C + c with `range_major`)."""
  pad = (patch_size - 1) // 2
  b, h, w, c = x.shape
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  out_h = (h + 2 * pad - patch_size) // stride + 1
  out_w = (w + 2 * pad - patch_size) // stride + 1

  def shifted(o):
    i, j = divmod(o, patch_size)
    return x[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride, :]

  sums = []
  for lo, hi in ranges:
    total = shifted(lo)
    for o in range(lo + 1, hi):
      total = total + shifted(o)
    sums.append(total)
  if len(sums) == 1:
    return sums[0]
  # Range-major stacking writes whole channel rows (interleaving R maps costs 10x more).
  return jnp.stack(sums, axis=-2 if range_major else -1).reshape(b, out_h, out_w, c * len(sums))


def _pool_stage(x, plan, *, patch_size, stride):
  """One stage's channel pooling from a (ranges, index, weight) plan: [B, h, w, C] -> [B, h', w',
  bins]. Box sums stacked channel-major ([C, R]) when that makes the bins consecutive groups
  (no gather), else range-major ([R, C]) for the gather."""
  ranges, index, weight = plan
  num_ranges, channels = len(ranges), x.shape[-1]
  flat = index.reshape(-1)
  range_major = not np.array_equal(flat, np.arange(flat.size))
  if range_major:  # Entry c * R + r -> r * C + c.
    index = (index % num_ranges) * channels + index // num_ranges
  sums = _window_sums(x, ranges, patch_size=patch_size, stride=stride, range_major=range_major)
  if range_major:
    # Materialise the sums: fused into the gather, every gathered entry would re-evaluate the
    # stack of R shifted sums (5x slower).
    sums = lax.optimization_barrier(sums)
  return _weighted_take(sums, index, weight)


def neighbourhood_pool(x, *, patch_size=3, stride=1, out_size=1024):
  """`adaptive_avg_pool_1d(patchify(x), out_size)` without building the unfolded map.

  Args:
    x: [B, h, w, C] feature map.
    patch_size, stride: as `patchify`.
    out_size: adaptive-pooling length (any, including out_size > C * patch_size**2).
  Returns:
    [B, h', w', out_size], equal to the unfold-then-pool construction to float32 rounding.

  Unfolding and pooling are one fixed linear map: every pooled entry is a mean of box sums of
  single channels over parts of the window (`pooling_plan`). At WideResNet-50's layer2 (512
  channels, 1024 bins) bin 2c is channel c's first five window entries and bin 2c + 1 its last
  five; at layer3 (1024 channels) each bin is one channel's whole 3 x 3 box. The box sums are a
  handful of shifted adds over the map (one fused loop), not the [B, h', w', 9 C] unfolded copy.
  """
  return _pool_stage(x, pooling_plan(x.shape[-1], patch_size, out_size), patch_size=patch_size,
                     stride=stride)


def stage_plans(channels, *, patch_size, pretrain_dim, target_dim):
  """Per stage, the whole channel pooling of `patch_features` (to pretrain_dim, then the final
  pooling of the concatenated stages to target_dim) as one `pooling_plan`-style map.

  Args:
    channels: channel count of every stage.
  Returns:
    A list of (ranges, index [n_s, T], weight [n_s, T]), one per stage, n_s the final bins that
    stage fills (they sum to target_dim); or None when a final bin straddles two stages (then
    the stages are pooled, resized and concatenated before the final pooling).

  The final pooling acts on channels and the resize on space, so a final bin that lies inside
  one stage can be pooled before that stage is resized (fewer channels to resize, no
  [B, H, W, stages * pretrain_dim] concatenation).
  """
  length = len(channels) * pretrain_dim
  final_index, final_weight = adaptive_pool_bins(length, target_dim)
  owners = [{int(i) // pretrain_dim for i, w in zip(final_index[j], final_weight[j]) if w}
            for j in range(target_dim)]
  if any(len(o) != 1 for o in owners):
    return None
  plans = []
  for s, c in enumerate(channels):
    ranges, index, weight = pooling_plan(c, patch_size, pretrain_dim)
    combined = []
    for j in range(target_dim):
      if owners[j] != {s}:
        continue
      entries = collections.defaultdict(float)
      for i, fw in zip(final_index[j], final_weight[j]):
        if not fw:  # Padding entry.
          continue
        for k, w in zip(index[int(i) - s * pretrain_dim], weight[int(i) - s * pretrain_dim]):
          if w:
            entries[int(k)] += float(fw) * float(w)
      combined.append(sorted(entries.items()))
    width = max(len(e) for e in combined)
    idx = np.zeros((len(combined), width), np.int32)
    wts = np.zeros((len(combined), width), np.float32)
    for j, entries in enumerate(combined):
      for t, (k, w) in enumerate(entries):
        idx[j, t], wts[j, t] = k, w
    plans.append((ranges, idx, wts))
  return plans


def patch_features(stage_maps, *, patch_size=3, stride=1, pretrain_dim=1024, target_dim=1024):
  """Locally aware patch features from backbone stage outputs.

  Args:
    stage_maps: sequence of [B, h_i, w_i, C_i]; the first sets the patch grid.
    patch_size, stride: neighbourhood aggregation (official: 3 and 1).
    pretrain_dim: per-stage adaptive-pooling length (official `pretrain_embed_dimension`).
    target_dim: final adaptive-pooling length (official `target_embed_dimension`).
  Returns:
    [B, H, W, target_dim] float32, (H, W) the first stage's patch grid.

  Equal to `unfold_patch_features` (the literal construction) to float32 rounding and 5-10x
  faster: each stage's channel pooling is computed from box sums of its map (`pooling_plan`),
  composed with the final pooling where the final bins allow (`stage_plans`).
  """
  if not stage_maps:
    raise ValueError('patch_features needs at least one stage output')
  plans = stage_plans([x.shape[-1] for x in stage_maps], patch_size=patch_size,
                      pretrain_dim=pretrain_dim, target_dim=target_dim)
  pooled = []
  grid = None
  for s, x in enumerate(stage_maps):
    plan = pooling_plan(x.shape[-1], patch_size, pretrain_dim) if plans is None else plans[s]
    patches = _pool_stage(x, plan, patch_size=patch_size, stride=stride)  # [B, h, w, bins]
    grid = grid or patches.shape[1:3]
    if patches.shape[1:3] != grid:
      # Resize the pooled map, not its recipe: fused, each output would recompute it 4 times.
      patches = resize_bilinear(lax.optimization_barrier(patches), grid)
    pooled.append(patches)  # [B, H, W, ...]
  stacked = pooled[0] if len(pooled) == 1 else jnp.concatenate(pooled, axis=-1)
  if plans is None:
    # Official: stack -> [N, stages, pretrain_dim] -> flatten -> pool to target_dim.
    return adaptive_avg_pool_1d(stacked, target_dim)
  return stacked


def unfold_patch_features(stage_maps, *, patch_size=3, stride=1, pretrain_dim=1024,
                          target_dim=1024):
  """`patch_features` built literally, as the official code does: unfold every neighbourhood
  (`patchify`), pool the [B, h, w, 9 C] vectors, resize, concatenate, pool. The reference the
  fast path is tested against (and the benchmark's 'unfold' row)."""
  pooled = []
  grid = None
  for x in stage_maps:
    patches = adaptive_avg_pool_1d(patchify(x, patch_size=patch_size, stride=stride),
                                   pretrain_dim)
    grid = grid or patches.shape[1:3]
    pooled.append(resize_bilinear(patches, grid))
  return adaptive_avg_pool_1d(jnp.concatenate(pooled, axis=-1), target_dim)


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
  apply = functools.partial(backbones_lib.apply_model, backbone.model, dtype=backbone.dtype)
  fn = jax.jit(functools.partial(
      embed, apply, stages=backbone.stages, patch_size=patch_size, stride=stride,
      pretrain_dim=pretrain_dim, target_dim=target_dim))
  return functools.partial(fn, backbone.variables)
