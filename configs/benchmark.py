r"""Benchmark mode: every stage timed under jit and eagerly, against the machine's limits.

  python launch.py --config=configs/benchmark.py:backbone=wide_resnet50_2 --workdir=workdirs/bench

Random weights and generated inputs (nothing to download). Writes DIR/benchmark.json and
DIR/benchmark.md; see patchcore_jax/jobs/benchmark.py for what each row measures. Arguments: backbone
(any name in patchcore_jax.backbones.NAMES) and size=full|tiny (tiny: a seconds-long smoke run).
Optional rows: `pip install faiss-cpu==1.15.1`; torch (the official coreset loop) and torch
2.14.1 + torchvision 0.29.1 (ResNet forward). With a saved model and images, the kNN rows also
run on that model's bank and those images' patches:
  --config.knn.model=WORKDIR/models/bottle --config.knn.images=$R/bottle/test
and with a dataset root the whole experiment runs once and reports where its wall clock went
(vgg16 and efficientnet_lite2 have installable weights; ResNets need a checkpoint):
  --config.end_to_end.data.root=$R   (MVTec bottle, this backbone, 10 %)

Expected (wide_resnet50_2): the table in docs/benchmark.md, generated from the run recorded with
this config (its run.json names the machine and date).
"""
import ml_collections

from patchcore_jax import backbones
from configs import common
from configs import mvtec


def get_config(arg=None):
  args = common.parse_arg(arg, backbone='wide_resnet50_2', size='full')
  if args['size'] not in ('full', 'tiny'):
    raise ValueError(f"size must be 'full' or 'tiny', got {args['size']!r}")
  tiny = args['size'] == 'tiny'
  config = ml_collections.ConfigDict()
  config.job = 'benchmark'
  config.size = args['size']  # full | tiny (recorded for the command line in benchmark.md).
  config.seed = 0
  # Which stages to run (patchcore_jax.benchmark.PARTS); e.g. --config.parts="('backbone',)".
  config.parts = ('decode', 'backbone', 'embed', 'memory_bank', 'anomaly_maps', 'bank',
                  'end_to_end')
  config.image_size = 64 if tiny else 224  # Network input side.
  config.raw_size = 80 if tiny else 900  # Side of the generated PNG files (MVTec bottle: 900).
  config.decode_workers = 2  # Threads of the 'decode' part's pipeline row (as data.num_workers).
  config.resize = 72 if tiny else 256  # Shorter side before the centre crop.
  config.batch_size = 2 if tiny else 8  # Images per call; per-image rows divide by it.
  config.memory_bank_images = 4 if tiny else 32  # Images pushed through the memory-bank build.

  config.backbone = ml_collections.ConfigDict()
  config.backbone.name = args['backbone']  # Random weights (seed), so any architecture runs.
  config.backbone.stages = backbones.DEFAULT_STAGES[args['backbone']]
  config.backbone.fold_batchnorm = True  # As configs/common.py (ResNets only).

  config.features = ml_collections.ConfigDict()
  config.features.patch_size = 3
  config.features.pretrain_dim = 1024
  config.features.target_dim = 1024

  config.bank = ml_collections.ConfigDict()
  # Training images per bank; patches per image follow from image_size and the stride-8 stage
  # (209 x 784 x 1024 is MVTec bottle at 224 px).
  config.bank.num_images = 4 if tiny else 209
  config.bank.scales = (1, 2) if tiny else (1, 4)  # Bank sizes, as multiples of num_images.
  config.bank.percentages = (0.1, 0.01)  # Coreset sizes (greedy iterations) and kNN banks.
  config.bank.projection_dim = 128

  config.knn = ml_collections.ConfigDict()
  config.knn.block_size = 128
  config.knn.precision = 'highest'
  config.knn.screen = True  # Time the screened search too (k=1), beside the float32 scan.
  config.knn.model = ''  # A saved model directory: kNN rows on its bank too ...
  config.knn.images = ''  # ... with the patch features of the first batch of these images.

  # The whole experiment, run once when end_to_end.data.root is set (MVTec layout).
  config.end_to_end = mvtec.get_config(f'category=bottle,backbone={args["backbone"]}')

  config.timing = ml_collections.ConfigDict()
  config.timing.repeats = 3 if tiny else 7  # Timed calls per jit row (after one warm-up).
  config.timing.eager_repeats = 1 if tiny else 2  # Timed calls per eager / comparison row.
  # Greedy picks per timed call: all of bottle's 10 % (the cost per pick varies along the loop).
  config.timing.coreset_iterations = 20 if tiny else 20000
  config.timing.coreset_repeats = 2 if tiny else 1
  config.timing.coreset_eager_iterations = 3 if tiny else 10
  config.timing.numpy_iterations = 5 if tiny else 20

  # 'scale' (not in the default parts): the greedy coreset on generated banks of these sizes,
  # generated and projected block by block (never whole in memory), on every device JAX sees.
  # One size per process gives each its own peak RSS, e.g. --config.scale.rows="(10000000,)"
  # --config.scale.repeats=0 (one call of the whole 0.1 % coreset, its ~1 s compilation in it).
  config.scale = ml_collections.ConfigDict()
  config.scale.rows = (20000, 40000) if tiny else (655360, 2621440, 10000000)
  config.scale.percentage = 0.01 if tiny else 0.001
  config.scale.patches_per_image = 784  # kNN queries per image (28 x 28, as at 224 px).
  config.scale.repeats = 1  # Timed calls after the first (0: time the first call alone).

  config.compare = ml_collections.ConfigDict()
  config.compare.faiss = True  # faiss-cpu IndexFlatL2 rows, when faiss is installed.
  config.compare.torch = True  # torch rows (official coreset loop; torchvision ResNets), if importable.
  config.lock()
  return config
