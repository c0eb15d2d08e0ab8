"""patchcore-jax: PatchCore (Roth et al., CVPR 2022) in JAX.

The workflow, for a notebook or a script:

  import patchcore_jax as pc
  backbone = pc.load_backbone('efficientnet_lite2')   # BatchNorm folded, ready to score
  model = pc.fit(backbone, train_paths, pc.Settings(percentage=0.1), holdout=0.1)
  prediction = pc.predict(model, test_paths)   # image_scores, normalized_scores, anomalous, maps
  pc.save(model, 'models/bottle'); model = pc.load('models/bottle')
  pc.export(model, 'exported/bottle')           # runs with jax + numpy alone

The stages are modules of plain functions to compose, data flowing one way: `data` ->
`backbones` -> `features` -> `coreset` / `knn` (`memory_bank`, `stages`) -> `scoring` ->
`metrics` / `evaluation`; `visualize` draws maps; `sharded` (a device mesh) and `multihost`
(several processes) spread fit and predict. The jobs that `launch.py` runs from configs live in
`patchcore_jax.jobs` and are not imported here.
"""
from patchcore_jax import backbones
from patchcore_jax import coreset
from patchcore_jax import data
from patchcore_jax import errors
from patchcore_jax import evaluation
from patchcore_jax import features
from patchcore_jax import ivfpq
from patchcore_jax import knn
from patchcore_jax import memory_bank
from patchcore_jax import metrics
from patchcore_jax import multihost
from patchcore_jax import scoring
from patchcore_jax import sharded
from patchcore_jax import stages
from patchcore_jax import timing
from patchcore_jax import visualize
from patchcore_jax.backbones import BackboneSpec
from patchcore_jax.backbones import load_backbone
from patchcore_jax.deploy import export
from patchcore_jax.model import Calibration
from patchcore_jax.model import PatchCore
from patchcore_jax.model import Prediction
from patchcore_jax.model import Settings
from patchcore_jax.model import with_threshold
from patchcore_jax.patchcore import fit
from patchcore_jax.patchcore import predict
from patchcore_jax.saving import load
from patchcore_jax.saving import save
from patchcore_jax.version import __version__

__all__ = (
    # The workflow.
    'load_backbone', 'BackboneSpec', 'fit', 'predict', 'save', 'load', 'export',
    'with_threshold',
    # Records.
    'Settings', 'Calibration', 'PatchCore', 'Prediction',
    # Modules of plain functions.
    'backbones', 'coreset', 'data', 'errors', 'evaluation', 'features', 'ivfpq', 'knn',
    'memory_bank', 'metrics', 'multihost', 'scoring', 'sharded', 'stages', 'timing',
    'visualize',
    '__version__',
)
