"""No float32 matmul or convolution runs at default precision.

On Ampere and Hopper GPUs XLA runs a default-precision float32 matmul or convolution in TF32
(10-bit mantissa): scores drift, parity breaks, and tests with 1e-6 tolerances or exact coreset
picks fail for reasons unrelated to the product. Two checks keep every one explicit:
  * the jaxprs of every backbone architecture (classifier included), the patch features, the scorer, the
    coreset, IVF-PQ and the sweep's proxies hold no float32 `dot_general` or
    `conv_general_dilated` without a precision (a `@` between jax arrays is caught here too);
  * a lint: every `jnp.dot/matmul/einsum/tensordot/inner`, `lax.dot/dot_general/conv*` and
    `nn.Dense/Conv/DenseGeneral/Einsum` call in the package and in the tests names a
    `precision` (bfloat16 products name `preferred_element_type` instead), and no module that
    uses jax writes `@` (which cannot name one; np.matmul says the operands are numpy).
"""
import ast
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from patchcore_jax import backbones
from patchcore_jax import coreset
from patchcore_jax import ivfpq
from patchcore_jax import knn
from patchcore_jax import model as model_lib
from patchcore_jax import stages
from patchcore_jax.jobs import sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MATMULS = ('dot_general', 'conv_general_dilated')


def _subjaxprs(value):
  if hasattr(value, 'eqns'):
    yield value
  elif hasattr(value, 'jaxpr') and hasattr(value.jaxpr, 'eqns'):
    yield value.jaxpr
  elif isinstance(value, (tuple, list)):
    for item in value:
      yield from _subjaxprs(item)


def loose_matmuls(jaxpr):
  """(primitive, operand shapes) of every float32 matmul or convolution at default precision in
  a jaxpr, its sub-jaxprs (jit, loops, conds, custom derivatives) included."""
  found = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name in MATMULS:
      precision = eqn.params.get('precision')
      parts = precision if isinstance(precision, tuple) else (precision,)
      default = all(p is None or str(p).endswith('DEFAULT') for p in parts)
      if default and any(v.aval.dtype == jnp.float32 for v in eqn.invars):
        found.append((eqn.primitive.name, [tuple(v.aval.shape) for v in eqn.invars]))
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        found += loose_matmuls(sub)
  return found


def _jaxpr(fn, *args, **kwargs):
  return jax.make_jaxpr(fn, **kwargs)(*args).jaxpr


def test_the_detector_finds_a_default_precision_matmul():
  a = jnp.ones((4, 8), jnp.float32)
  assert loose_matmuls(_jaxpr(lambda x: x @ x.T, a)) == [('dot_general', [(4, 8), (8, 4)])]
  assert loose_matmuls(_jaxpr(jax.jit(lambda x: jnp.sum(x @ x.T)), a))  # Inside a jit.
  loop = lambda x: jax.lax.fori_loop(0, 2, lambda i, y: y @ jnp.eye(8), x)
  assert loose_matmuls(_jaxpr(loop, a))  # Inside a loop.
  assert not loose_matmuls(_jaxpr(lambda x: jnp.dot(x, x.T, precision='highest'), a))
  assert not loose_matmuls(_jaxpr(lambda x: x.astype(jnp.bfloat16) @ x.T.astype(jnp.bfloat16), a))


# One of each architecture's code paths (BasicBlock, grouped Bottleneck, VGG, DenseNet, the two
# depthwise families); the other depths and widths run the same modules, and the lint below reads
# every call.
@pytest.mark.parametrize('name', ['resnet18', 'resnext50_32x4d', 'vgg16', 'densenet201',
                                  'mobilenet_v2', 'efficientnet_lite0'])
def test_every_backbone_names_its_precision(name):
  module, _ = backbones.build_model(name, ('logits',))
  images = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(module.init, jax.random.key(0), images)
  assert loose_matmuls(_jaxpr(module.apply, variables, images)) == []


def test_features_scores_coreset_search_and_proxies_name_their_precision():
  backbone = backbones.load_backbone('efficientnet_lite0', random_seed=0, image_size=64)
  settings = model_lib.Settings(image_size=64, resize=64, batch_size=2)
  images = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  embed = lambda v, x: stages.embed(v, x, **dict(stages._embed_static(backbone, settings)))  # pylint: disable=protected-access
  assert loose_matmuls(_jaxpr(embed, backbone.variables, images)) == []
  feats = jax.eval_shape(embed, backbone.variables, images)
  rng = np.random.default_rng(0)
  rows = rng.normal(size=(300, feats.shape[-1])).astype(np.float32)
  score = lambda b, f: stages.score(b, f, **dict(stages._score_static(settings, None)))  # pylint: disable=protected-access
  assert loose_matmuls(_jaxpr(score, knn.prepare_bank(rows), feats)) == []
  features = jnp.asarray(rows)
  matrix = coreset.random_projection(jax.random.key(0), features.shape[1], 16)
  assert loose_matmuls(_jaxpr(coreset._project_block, features, matrix)) == []  # pylint: disable=protected-access
  projected_t = coreset.project(features, matrix)
  assert loose_matmuls(_jaxpr(lambda p: coreset.initial_distances(p, jax.random.key(1)),
                              projected_t)) == []
  init = coreset.initial_distances(projected_t, jax.random.key(1))
  loop = lambda p, d: coreset.greedy_coreset_loop(p, d, num_samples=10)
  assert loose_matmuls(_jaxpr(loop, projected_t, init)) == []
  index = ivfpq.build(rows, nlist=4, subquantizers=8, key=jax.random.key(2), train_rows=300,
                      pq_train_rows=300)
  queries = jnp.asarray(rows[:10])
  assert loose_matmuls(_jaxpr(lambda q: ivfpq.search(q, index, nprobe=2), queries)) == []
  loss = lambda p, b: sweep.proxy_loss(p, b, temperature=1.0)
  assert loose_matmuls(_jaxpr(jax.grad(loss), features[:8], features)) == []


# ---------------------------------------------------------------------------- The lint.

CALLS = {('jnp', n) for n in ('dot', 'matmul', 'einsum', 'tensordot', 'inner', 'vdot')} | {
    ('lax', n) for n in ('dot', 'dot_general', 'conv', 'conv_general_dilated',
                         'conv_with_general_padding', 'batch_matmul')} | {
    ('nn', n) for n in ('Dense', 'Conv', 'DenseGeneral', 'Einsum', 'ConvTranspose')}


def _python_files():
  for folder in ('patchcore_jax', 'tests', 'configs'):
    for root, _, names in os.walk(os.path.join(ROOT, folder)):
      for name in sorted(names):
        if name.endswith('.py') and name != 'test_precision.py':  # Its detector's examples.
          yield os.path.join(root, name)
  yield os.path.join(ROOT, 'launch.py')


def _unnamed_precision(path):
  with open(path) as f:
    tree = ast.parse(f.read(), path)
  found = []
  uses_jax = any(isinstance(node, (ast.Import, ast.ImportFrom)) and any(
      (getattr(node, 'module', None) or alias.name).split('.')[0] == 'jax' for alias in node.names)
      for node in ast.walk(tree))
  for node in ast.walk(tree):
    if uses_jax and isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
      # A `@` cannot name a precision: in a module that uses jax, write np.matmul for numpy
      # arrays and jnp.matmul(..., precision=...) for jax arrays.
      found.append(f'{os.path.relpath(path, ROOT)}:{node.lineno}: @')
    if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)):
      continue
    owner = node.func.value
    owner = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, 'id', None)
    if (owner, node.func.attr) not in CALLS:
      continue
    keywords = {k.arg for k in node.keywords}
    if not keywords & {'precision', 'preferred_element_type', None}:  # None: **kwargs.
      found.append(f'{os.path.relpath(path, ROOT)}:{node.lineno}: {owner}.{node.func.attr}')
  return found


def test_lint_every_matmul_call_names_its_precision():
  found = [line for path in _python_files() for line in _unnamed_precision(path)]
  assert found == [], 'name a precision (lax.Precision.HIGHEST for float32):\n' + '\n'.join(found)
