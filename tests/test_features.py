"""Patch features against torch: Unfold, adaptive_avg_pool1d, interpolate, the official _embed."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from patchcore_jax import features


def _nhwc(x):
  return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


@pytest.mark.parametrize('in_size,out_size', [(14, 28), (13, 28), (28, 14), (7, 224), (5, 5)])
def test_interpolation_matrix_matches_torch(in_size, out_size):
  x = torch.randn(1, 1, in_size, 1, dtype=torch.float64)
  ref = F.interpolate(x, size=(out_size, 1), mode='bilinear', align_corners=False)[0, 0, :, 0]
  ours = np.matmul(features.interpolation_matrix(in_size, out_size).astype(np.float64),
                   x[0, 0, :, 0].numpy())
  np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-6, atol=1e-6)


def test_resize_bilinear_matches_torch():
  x = torch.randn(2, 5, 14, 11)
  ref = F.interpolate(x, size=(28, 23), mode='bilinear', align_corners=False)
  ours = features.resize_bilinear(_nhwc(x), (28, 23))
  np.testing.assert_allclose(np.asarray(ours), ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


@pytest.mark.parametrize('patch_size,stride', [(3, 1), (5, 1), (3, 2), (1, 1)])
def test_patchify_matches_torch_unfold(patch_size, stride):
  x = torch.randn(2, 4, 9, 7)
  pad = (patch_size - 1) // 2
  ref = F.unfold(x, kernel_size=patch_size, stride=stride, padding=pad)  # [B, C*p*p, L]
  ours = features.patchify(_nhwc(x), patch_size=patch_size, stride=stride)
  b, h, w, d = ours.shape
  np.testing.assert_array_equal(np.asarray(ours).reshape(b, h * w, d),
                                ref.permute(0, 2, 1).numpy())


@pytest.mark.parametrize('length,out', [(4608, 1024), (9216, 1024), (432, 1024), (1080, 1024),
                                        (2048, 1024), (10, 3), (7, 7), (3, 10)])
def test_adaptive_avg_pool_matches_torch(length, out):
  x = torch.randn(6, length)
  ref = F.adaptive_avg_pool1d(x[:, None], out)[:, 0]
  ours = features.adaptive_avg_pool_1d(jnp.asarray(x.numpy()), out)
  np.testing.assert_allclose(np.asarray(ours), ref.numpy(), rtol=1e-5, atol=1e-6)


def _official_embed(maps, patch_size=3, stride=1, pretrain_dim=1024, target_dim=1024):
  """PatchCore's `_embed` after feature extraction, transcribed from the official code."""
  padding = (patch_size - 1) // 2
  feats, shapes = [], []
  for x in maps:
    unfolded = F.unfold(x, kernel_size=patch_size, stride=stride, padding=padding)
    n = [int((s + 2 * padding - (patch_size - 1) - 1) / stride + 1) for s in x.shape[-2:]]
    unfolded = unfolded.reshape(*x.shape[:2], patch_size, patch_size, -1).permute(0, 4, 1, 2, 3)
    feats.append(unfolded)
    shapes.append(n)
  ref = shapes[0]
  for i in range(1, len(feats)):
    f = feats[i].reshape(feats[i].shape[0], shapes[i][0], shapes[i][1], *feats[i].shape[2:])
    f = f.permute(0, -3, -2, -1, 1, 2)
    base = f.shape
    f = f.reshape(-1, *f.shape[-2:])
    f = F.interpolate(f.unsqueeze(1), size=(ref[0], ref[1]), mode='bilinear', align_corners=False)
    f = f.squeeze(1).reshape(*base[:-2], ref[0], ref[1]).permute(0, -2, -1, 1, 2, 3)
    feats[i] = f.reshape(len(f), -1, *f.shape[-3:])
  feats = [x.reshape(-1, *x.shape[-3:]) for x in feats]
  pooled = [F.adaptive_avg_pool1d(x.reshape(len(x), 1, -1), pretrain_dim).squeeze(1) for x in feats]
  stacked = torch.stack(pooled, dim=1)
  return F.adaptive_avg_pool1d(stacked.reshape(len(stacked), 1, -1), target_dim).reshape(
      len(stacked), -1)


@pytest.mark.parametrize('channels,dims', [((16, 24), (64, 64)), ((48, 120), (1024, 1024)),
                                           ((512, 1024), (1024, 1024))])
def test_patch_features_match_official_embed(channels, dims):
  torch.manual_seed(0)
  maps = [torch.randn(2, channels[0], 8, 8), torch.randn(2, channels[1], 4, 4)]
  ref = _official_embed(maps, pretrain_dim=dims[0], target_dim=dims[1])
  ours = features.patch_features([_nhwc(m) for m in maps], pretrain_dim=dims[0],
                                 target_dim=dims[1])
  assert ours.shape == (2, 8, 8, dims[1])
  np.testing.assert_allclose(np.asarray(ours).reshape(-1, dims[1]), ref.numpy(), atol=2e-5)


@pytest.mark.parametrize('channels,patch_size,stride,dims', [
    ((512, 1024), 3, 1, (1024, 1024)),  # WideResNet-50: half windows, whole windows.
    ((512, 512), 3, 1, (1024, 1024)),  # VGG16.
    ((48, 120), 3, 1, (1024, 1024)),  # EfficientNet-Lite2: 432 and 1080 values, overlapping bins.
    ((24, 40, 16), 3, 1, (100, 64)),  # Three stages.
    ((16, 24), 5, 1, (96, 51)),  # A final bin straddles the two stages.
    ((16, 24), 1, 1, (100, 64)),
    ((16, 24), 3, 2, (96, 51)),
    ((10, 7), 7, 3, (256, 128))])
def test_fast_patch_features_equal_the_unfolding(channels, patch_size, stride, dims):
  """Box sums == unfold + adaptive pooling, to float32 rounding, for any channel count, window,
  stride and pooling lengths (including final bins that straddle two stages: dims (96, 51))."""
  rng = np.random.default_rng(sum(channels) + patch_size + stride)
  sizes = [(10, 9), (5, 5), (3, 3)]
  maps = [jnp.asarray(rng.standard_normal((2, *sizes[i], c)).astype(np.float32) + 0.5)
          for i, c in enumerate(channels)]
  kwargs = dict(patch_size=patch_size, stride=stride, pretrain_dim=dims[0], target_dim=dims[1])
  fast = np.asarray(jax.jit(lambda m: features.patch_features(m, **kwargs))(maps))
  literal = np.asarray(jax.jit(lambda m: features.unfold_patch_features(m, **kwargs))(maps))
  assert fast.shape == literal.shape
  np.testing.assert_allclose(fast, literal, rtol=2e-6, atol=2e-6 * np.abs(literal).max())


def test_stage_plans_compose_the_final_pooling_where_bins_stay_inside_a_stage():
  plans = features.stage_plans([512, 1024], patch_size=3, pretrain_dim=1024, target_dim=1024)
  (ranges2, index2, weight2), (ranges3, index3, weight3) = plans
  # layer2: output c = (first five + last five window entries of channel c) / 10, no gather.
  assert ranges2 == ((0, 5), (4, 9)) and index2.shape == (512, 2)
  np.testing.assert_array_equal(index2.reshape(-1), np.arange(1024))
  np.testing.assert_allclose(weight2, 0.1)
  # layer3: output j = whole windows of channels 2j and 2j + 1, / 18.
  assert ranges3 == ((0, 9),) and index3.shape == (512, 2)
  np.testing.assert_allclose(weight3, 1 / 18)
  # 2 * 96 values pooled to 51 bins: bin 25 averages values 94..97, across the two stages.
  assert features.stage_plans([8, 8], patch_size=3, pretrain_dim=96, target_dim=51) is None
  assert features.stage_plans([8, 8], patch_size=3, pretrain_dim=96, target_dim=50) is not None


@pytest.mark.parametrize('channels,out', [(512, 1024), (48, 1024), (7, 5), (3, 100)])
def test_neighbourhood_pool_matches_torch_unfold_and_pool(channels, out):
  x = torch.randn(2, channels, 6, 5)
  ref = F.adaptive_avg_pool1d(F.unfold(x, kernel_size=3, padding=1).permute(0, 2, 1).reshape(
      -1, 1, channels * 9), out)[:, 0]
  ours = features.neighbourhood_pool(_nhwc(x), patch_size=3, out_size=out)
  np.testing.assert_allclose(np.asarray(ours).reshape(-1, out), ref.numpy(), rtol=1e-5,
                             atol=1e-6)


def test_normalize():
  x = jnp.ones((1, 2, 2, 3)) * 0.5
  out = np.asarray(features.normalize(x))[0, 0, 0]
  np.testing.assert_allclose(out, (0.5 - np.array(features.IMAGENET_MEAN)) /
                             np.array(features.IMAGENET_STD), rtol=1e-6)


def test_embed_compiles_once_per_shape():
  traces = []

  def apply(variables, x):
    traces.append(x.shape)
    return {'a': x[:, ::2, ::2] * variables, 'b': x[:, ::4, ::4]}

  fn = jax.jit(lambda v, x: features.embed(apply, v, x, stages=('a', 'b'), pretrain_dim=8,
                                           target_dim=8))
  for _ in range(3):
    fn(2.0, jnp.ones((2, 16, 16, 3)))
  fn(2.0, jnp.ones((3, 16, 16, 3)))
  assert len(traces) == 2


@pytest.mark.parametrize('shape,resize,size', [((2, 40, 52), 32, 24), ((1, 50, 30), 32, 28),
                                               ((1, 20, 20), None, 28)])
def test_preprocess_matches_torch_resize_crop_normalize(shape, resize, size):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, shape + (3,), dtype=np.uint8)
  x = torch.from_numpy(images).permute(0, 3, 1, 2).double() / 255.0
  b, h, w = shape
  if resize is None:
    x = F.interpolate(x, size=(size, size), mode='bilinear', align_corners=False)
  else:
    new = (resize, int(resize * w / h)) if h <= w else (int(resize * h / w), resize)
    x = F.interpolate(x, size=new, mode='bilinear', align_corners=False, antialias=False)
    top, left = int(round((new[0] - size) / 2.0)), int(round((new[1] - size) / 2.0))
    x = x[:, :, top:top + size, left:left + size]
  mean = torch.tensor(features.IMAGENET_MEAN, dtype=torch.float64)[None, :, None, None]
  std = torch.tensor(features.IMAGENET_STD, dtype=torch.float64)[None, :, None, None]
  ref = ((x - mean) / std).permute(0, 2, 3, 1).numpy()
  ours = jax.jit(lambda i: features.preprocess(i, image_size=size, resize=resize))(images)
  assert ours.shape == (b, size, size, 3)
  np.testing.assert_allclose(np.asarray(ours), ref, atol=2e-5)
  floats = features.preprocess(images.astype(np.float32) / 255.0, image_size=size, resize=resize)
  np.testing.assert_allclose(np.asarray(floats), ref, atol=2e-5)
