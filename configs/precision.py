r"""float32 against bfloat16 backbones, side by side in one run (`backbone.dtype`).

  python launch.py --config=configs/precision.py --config.data.root=/path/to/mvtec \
      --workdir=workdirs/precision_bottle
  python launch.py --config=configs/precision.py:dataset=mtd,percentages=0.01 \
      --config.data.root=/path/to/mtd --workdir=workdirs/precision_mtd

A sweep: every backbone's features are extracted once per dtype (float32, then bfloat16:
bfloat16 products with float32 accumulation, float32 patch features, coreset and distances),
each bank subsampled by the greedy coreset and scored; report.md puts image AUROC, pixel AUROC,
AU-PRO and ms per test image (embedding + search) of the two dtypes side by side.

Arguments: dataset (mvtec | mtd), category (MVTec, '+'-joined), backbones ('+'-joined, default
vgg16+efficientnet_lite2), percentages ('+'-joined, default 0.1).
Ours, bottle, 10 %, 2-core AMD EPYC with AVX-512 BF16 (image AUROC / pixel AUROC / AU-PRO, ms per
test image): VGG16 float32 99.52 / 96.95 / 90.44, 197.0 ms; bfloat16 99.68 / 96.91 / 90.28,
161.8 ms. EfficientNet-Lite2 float32 100.00 / 98.67 / 95.07, 87.2 ms; bfloat16 100.00 / 98.68 /
95.06, 83.5 ms (3 min 10 s in all). Table and MTD: docs/accelerators.md.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, dataset='mvtec', category='bottle',
                          backbones='vgg16+efficientnet_lite2', percentages='0.1')
  config = common.dataset_sweep_base(args)
  config.sweep.dtypes = ('float32', 'bfloat16')
  config.lock()
  return config
