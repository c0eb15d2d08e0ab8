r"""The GPU check: the accelerator paths proved and timed on a GPU, in one command (job 'gpu_check').

  python launch.py --config=configs/gpu_check.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/gpu_check

On a machine with a GPU and JAX's CUDA build (pip install ".[cuda12]"). It stops at once (exit
2, naming the backend and devices) unless jax.default_backend() is a GPU; --config.allow_cpu=True
runs it on the CPU (CI does, on a few images: check.max_images=12). gpu_check.json grows section
by section as the check runs; gpu_check.md is the report (patchcore_jax/jobs/gpu_check.py says
what each section measures).

On MVTec bottle pre-resized to 256 px (a copy in the workdir), EfficientNet-Lite2, 10 % coreset:
metrics and every test image's score are compared with the CPU's, stored in
docs/results/gpu_check_cpu/gpu_check.json (this check run with allow_cpu=True; remade by
`python docs/make_tables.py record gpu_check_cpu -- python launch.py
--config=configs/gpu_check.py --config.allow_cpu=True --config.data.root=... --workdir=W`).
Expected: ok; metrics within 0.005 of the CPU's (image AUROC / pixel AUROC / AU-PRO 1.0000 /
0.9868 / 0.9507 there) and every image's score within 2 %, in under 8 minutes (the CPU, 2-core
AMD EPYC, takes 5 min 10 s: docs/accelerators.md).
"""
import os

import ml_collections

from configs import common

REFERENCE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'docs',
                         'results', 'gpu_check_cpu', 'gpu_check.json')


def get_config(arg=None):
  common.parse_arg(arg)
  config = common.get_base_config('efficientnet_lite2')
  config.job = 'gpu_check'
  config.allow_cpu = False  # True: run on the CPU too (CI; the reference was made so).
  config.data.name = 'mvtec'
  config.data.categories = ('bottle',)
  config.coreset.percentage = 0.1
  config.check = ml_collections.ConfigDict()
  config.check.reference = REFERENCE  # The CPU's gpu_check.json to compare with ('': none).
  config.check.batch_sizes = (8, 32)  # Batch sizes of the embedding timings.
  config.check.repeats = 5  # Timed calls per measurement (median).
  config.check.coreset_picks = 2000  # Greedy picks timed per method.
  config.check.max_images = 0  # > 0: only this many training and test images (no comparison).
  config.lock()
  return config
