"""Shared defaults. Every field is overridable from the command line, e.g.
`--config.coreset.percentage=0.01`; the config is locked, so a misspelt key fails loudly."""
import ml_collections


def parse_arg(arg, **defaults):
  """'category=bottle,backbone=vgg16' -> dict, starting from `defaults`; unknown keys fail."""
  out = dict(defaults)
  for item in filter(None, (arg or '').split(',')):
    key, sep, value = item.partition('=')
    if not sep or key not in out:
      raise ValueError(f'bad config argument {item!r}; known keys: {sorted(out)}')
    out[key] = type(out[key])(value) if out[key] is not None else value
  return out


def get_base_config(backbone='efficientnet_lite2'):
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Devices to split the work over (patchcore_jax.sharded): image batches data-parallel, the
  # coreset's projection and the test-time bank by rows. 1: one device; 0: every device (over
  # every process with config.distributed). data.batch_size must be a multiple of it.
  config.devices = 1
  # Several processes as one job (patchcore_jax.multihost): each reads its share of the images;
  # the coreset spans every process's devices; process 0 writes the outputs. '' : one process.
  config.distributed = ml_collections.ConfigDict()
  config.distributed.coordinator_address = ''  # host:port of process 0, e.g. 10.0.0.1:12345.
  config.distributed.num_processes = 1
  config.distributed.process_id = 0
  config.distributed.timeout_seconds = 300  # How long to wait for the other processes to join.

  config.data = ml_collections.ConfigDict()
  config.data.name = 'mvtec'  # mvtec | mtd | folder | synthetic
  config.data.root = ''  # Dataset root (for mvtec: the folder holding the category folders).
  # folder: read the files under data.root; tfds: read TFDS array_record datasets built from them
  # (on first use; then data.root may be empty) under data.tfds_data_dir (data.tfds_builders).
  config.data.source = 'folder'
  config.data.tfds_data_dir = ''  # '': TFDS's default ($TFDS_DATA_DIR or ~/tensorflow_datasets).
  config.data.categories = ('bottle',)  # mvtec / synthetic categories to run.
  config.data.transform = 'resize_crop'  # resize_crop: shorter side -> resize, centre crop; resize: square.
  config.data.resize = 256  # Shorter side before the centre crop (resize_crop only).
  config.data.image_size = 224  # Network input size (the paper also runs 280 and 320).
  config.data.batch_size = 8
  # Image-decoding threads; 0: what the machine suits (2 on the CPU, one per core up to 16 with
  # an accelerator: data.common.decode_workers).
  config.data.num_workers = 0
  config.data.max_train_images = -1  # > 0: use only the first N training images.

  config.backbone = ml_collections.ConfigDict()
  config.backbone.name = backbone  # One of patchcore_jax.backbones.NAMES.
  # Stages to aggregate; () follows the backbone (its stride-8 and stride-16 stages,
  # patchcore_jax.backbones.DEFAULT_STAGES), also when backbone.name is overridden.
  config.backbone.stages = ()
  config.backbone.checkpoint = ''  # Weights file; required for the ResNet family.
  config.backbone.cache_dir = ''  # Converted .npz weights ('' -> $PATCHCORE_JAX_CACHE or ~/.cache).
  config.backbone.random_seed = -1  # >= 0: seeded random weights (tests, benchmarks).
  # Reproduce the official code's BatchNorm side effect (train-mode passes on an all-ones image
  # before extraction; see backbones.official_bn_probe). 0 = plain inference, as the paper.
  config.backbone.official_bn_probe_passes = 0
  # Fold BatchNorm into the convolution before it (ResNets; same outputs up to float32 rounding,
  # about 5 % faster on CPU). Applied after the probe above.
  config.backbone.fold_batchnorm = True
  # How convolutions are computed: 'auto' (the CPU-tuned paths on the CPU: 1x1 as matmuls,
  # Winograd, shifted sums; XLA's convolutions elsewhere), 'tuned' or 'xla'. Same outputs to
  # float32 rounding.
  config.backbone.conv = 'auto'
  # What the backbone computes in: 'float32' (parity with the official code) or 'bfloat16'
  # (mixed precision: bfloat16 weights, convolutions and activations; patch features, coreset
  # and distances in float32). Speed and metric change: docs/benchmark.md.
  config.backbone.dtype = 'float32'

  config.features = ml_collections.ConfigDict()
  config.features.patch_size = 3  # Neighbourhood aggregation p.
  config.features.patch_stride = 1
  config.features.pretrain_dim = 1024  # Per-stage adaptive pooling length.
  config.features.target_dim = 1024  # Final patch-feature length.

  config.coreset = ml_collections.ConfigDict()
  config.coreset.percentage = 0.1  # Fraction of patches kept; 1.0 keeps the whole bank.
  config.coreset.projection_dim = 128  # Johnson-Lindenstrauss projection for coreset distances.
  config.coreset.num_starts = 10  # Random points defining the initial distances.
  # The greedy loop: 'auto' (lazy blocks on the CPU, a full pass per pick with a fixed trip count
  # on a GPU or TPU), 'lazy' or 'full'. The same picks either way.
  config.coreset.method = 'auto'
  # A memory bank larger than this (GiB) streams to a temporary file while it is built: memory
  # then holds its 128-d projection, one block and the selected rows (memory_bank.DiskBank).
  config.coreset.memory_budget_gb = 8.0
  config.coreset.spill_dir = ''  # The file's folder ('': the system's temporary directory).

  config.knn = ml_collections.ConfigDict()
  config.knn.k = 1  # Nearest neighbours averaged into a patch score (the official code uses 1).
  # Memory-bank rows per distance block: 'auto' (128 on the CPU, fastest on 2 cores; 4096 on
  # accelerators, knn.BLOCK_SIZES) or a positive integer.
  config.knn.block_size = 'auto'
  config.knn.precision = 'highest'  # Matmul precision of the distances (default|high|highest).
  # k=1, banks of >= 4096 rows: screen the bank in bfloat16 and measure the few rows that could
  # win in float32; exact; 1.35x the float32 scan's speed on the 10 % bottle bank
  # (docs/benchmark.md). 'auto' (on the CPU, off on accelerators), True or False.
  config.knn.screen = 'auto'

  config.scoring = ml_collections.ConfigDict()
  config.scoring.distance = 'squared_l2'  # squared_l2 (official code) | l2 (paper).
  config.scoring.reweight = False  # Paper Eq. 7 image-score reweighting (not in the official code).
  config.scoring.reweight_neighbours = 9  # b in Eq. 7.
  config.scoring.sigma = 4.0  # Gaussian smoothing of the anomaly maps.

  config.calibration = ml_collections.ConfigDict()
  # Fraction of the good training images held out of the memory bank to set the decision
  # threshold on (0 keeps the paper's setting: every training image in the bank; the threshold
  # then comes from the labelled test data's F1 optimum).
  config.calibration.holdout = 0.0
  config.calibration.target_fpr = 0.01  # False-positive rate on the held-out images.

  config.output = ml_collections.ConfigDict()
  config.output.num_overlays = 8  # Labelled anomaly-map overlay PNGs per category.
  config.output.save_model = True  # Save each category's fitted model under models/<category>.
  config.output.progress = False  # Progress bars (tqdm) beside the logs.
  # A workdir holding another run's outputs is refused; True replaces those outputs.
  config.output.overwrite = False
  return config


def dataset_sweep_base(args):
  """The unlocked sweep config over `args['backbones']` ('+'-joined) on `args['dataset']`: 'mvtec'
  (the '+'-joined `args['category']`) or 'mtd' (configs/mtd.py's protocol: resize, no crop), at
  the '+'-joined coreset fractions `args['percentages']`."""
  names = tuple(args['backbones'].split('+'))
  config = get_base_config(names[0])
  config.job = 'sweep'
  if args['dataset'] == 'mtd':
    config.data.name = 'mtd'
    config.data.categories = ('mtd',)
    config.data.transform = 'resize'
  elif args['dataset'] == 'mvtec':
    config.data.name = 'mvtec'
    config.data.categories = tuple(args['category'].split('+'))
  else:
    raise ValueError(f"dataset must be mvtec or mtd, got {args['dataset']!r}")
  config.sweep = sweep_config()
  config.sweep.backbones = names
  config.sweep.percentages = tuple(float(p) for p in args['percentages'].split('+'))
  config.sweep.seeds = ()
  return config


def sweep_config():
  """The `config.sweep` fields of a sweep (patchcore_jax/jobs/sweep.py)."""
  sweep = ml_collections.ConfigDict()
  # Methods: patchcore, and the paper's baselines padim | spade | mahalanobis (patchcore_jax.
  # baselines) on the same backbones (sweep.backbones) and dtypes, at the stages their papers use.
  sweep.methods = ('patchcore',)
  sweep.subsamplers = ('greedy',)  # Some of greedy | random | proxies.
  sweep.percentages = (0.1,)  # Fractions of the bank kept; 1.0: the whole bank.
  sweep.proxies = ml_collections.ConfigDict()
  sweep.proxies.steps = 200  # Adam steps of Eq. 8 per proxy set.
  sweep.proxies.batch_size = 512  # Bank rows per step.
  sweep.proxies.learning_rate = 0.01
  sweep.proxies.sign = 'softmin'  # softmin (default) | printed (Eq. 8's sign as printed) | both.
  # Feature axes: every combination is extracted once ('()': the config's own value).
  sweep.backbones = ()  # Backbone names.
  sweep.dtypes = ()  # Backbone compute types: float32 | bfloat16 (backbone.dtype).
  sweep.hierarchies = ()  # Feature levels, '+'-joined: '2+3' (default stages), '1+2+3', ...
  sweep.image_sizes = ()  # Network input sizes; data.resize is scaled alike (224/256 -> 280/320).
  sweep.patch_sizes = ()  # Neighbourhood sizes p.
  sweep.strides = ()  # Neighbourhood strides s.
  # Low-shot: banks of this many training images (each seed draws other images); () = all.
  sweep.shots = ()
  sweep.seeds = (0, 1, 2)
  # Search and scoring axes, per bank ('()': the config's knn.k, scoring.distance, reweight).
  sweep.searches = ('exact',)  # exact | ivfpq (approximate, patchcore_jax.ivfpq).
  sweep.ks = ()
  sweep.distances = ()
  sweep.reweights = ()
  sweep.ivfpq = ml_collections.ConfigDict()
  sweep.ivfpq.nlist = 512  # Coarse cells (the official code's faiss IndexIVFPQ: 512, 64, 8 bits).
  sweep.ivfpq.subquantizers = 64  # Bytes per row (each codes D / 64 dimensions with 8 bits).
  sweep.ivfpq.nprobe = (1,)  # Cells visited per query (faiss's default: 1); one variant each.
  sweep.ivfpq.train_rows = 65536  # Rows the coarse quantiser is trained on.
  sweep.ivfpq.iterations = 20  # k-means iterations.
  sweep.ivfpq.percentages = ()  # Banks (sweep.percentages) searched with IVF-PQ; (): every one.
  # Also the ensemble of sweep.backbones (scores and maps min-max normalised per backbone over
  # the test set, then averaged: the official code's combination).
  sweep.ensemble = False
  sweep.overlays = 0  # Labelled overlays of the first variant per category (overlays/<category>).
  sweep.paper = ''  # The paper's experiment this reruns (a key of configs/paper/statements.json).
  sweep.paper_statements = ()  # Its statements, printed in report.md (configs.paper.set_paper).
  return sweep
