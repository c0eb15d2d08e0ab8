"""patchcore-jax: PatchCore (Roth et al., CVPR 2022) in JAX.

The workflow, for a notebook or a script:

  import patchcore_jax as pc
  backbone = pc.backbones.fold_batchnorm(pc.backbones.load_backbone('efficientnet_lite2'))
  model = pc.fit(backbone, train_paths, percentage=0.1, holdout=0.1)
  prediction = pc.predict(model, test_paths)   # image_scores, normalized_scores, anomalous, maps
  pc.save(model, 'models/bottle'); model = pc.load('models/bottle')
  pc.export(model, 'exported/bottle')           # runs with jax + numpy alone

The stages are modules of plain functions to compose: `backbones`, `features`, `coreset`, `knn`,
`scoring`, `metrics`, `data`, `visualize`; `sharded` (a device mesh) and `multihost` (several
processes) spread fit and predict; `experiment.run(config, workdir)` is what `launch.py` runs.
"""
from patchcore_jax import backbones
from patchcore_jax import coreset
from patchcore_jax import data
from patchcore_jax import errors
from patchcore_jax import experiment
from patchcore_jax import features
from patchcore_jax import knn
from patchcore_jax import metrics
from patchcore_jax import multihost
from patchcore_jax import patchcore
from patchcore_jax import scoring
from patchcore_jax import sharded
from patchcore_jax import visualize
from patchcore_jax.deploy import export
from patchcore_jax.patchcore import Calibration
from patchcore_jax.patchcore import fit
from patchcore_jax.patchcore import PatchCore
from patchcore_jax.patchcore import predict
from patchcore_jax.patchcore import Prediction
from patchcore_jax.patchcore import Settings
from patchcore_jax.patchcore import with_threshold
from patchcore_jax.saving import load
from patchcore_jax.saving import save
from patchcore_jax.version import __version__
