r"""Tables 1-3's comparison on one dataset: PatchCore beside PaDiM, SPADE and MahalanobisAD.

  python launch.py --config=configs/paper/comparison.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/comparison_bottle
  python launch.py --config=configs/paper/comparison.py:dataset=mtd,backbones=efficientnet_lite2 \
      --config.data.root=/path/to/mtd --workdir=workdirs/comparison_mtd

One sweep: each backbone's features are extracted once for PatchCore (stages 2+3, the greedy
coreset at every percentage) and once for the baselines (levels 1-3 for PaDiM and SPADE's pixels,
every level the backbone has for MahalanobisAD and SPADE's image ranking;
patchcore_jax/baselines.py), all at 224 px, every method scored on the same test
images: image AUROC, pixel AUROC, AU-PRO (PaDiM and SPADE map; MahalanobisAD scores whole images)
and ms per image in report.md.

Arguments: dataset (mvtec | mtd; MTD with configs/mtd.py's protocol), category ('+'-joined MVTec
categories), backbones ('+'-joined), percentages ('+'-joined PatchCore coreset fractions),
methods ('+'-joined, default all).

Ours, 2-core AMD EPYC (image AUROC / pixel AUROC / AU-PRO, ms per test image; docs/paper.md):
  bottle, EfficientNet-Lite2: PatchCore-10 % 100.00 / 98.67 / 95.07, 86 ms; PatchCore-1 % 100.00 /
  98.51 / 94.95, 31 ms; PaDiM 99.76 / 97.98 / 91.68, 41 ms; SPADE 98.10 / 98.56 / 95.91, 1,145 ms;
  MahalanobisAD 99.60 (image only), 35 ms. VGG16: PatchCore-10 % 99.52 / 96.95 / 90.44; PaDiM
  99.44 / 97.17 / 91.00; SPADE 97.86 / 94.29 / 88.81 (9.2 s per image); MahalanobisAD 99.52.
  19 min 23 s in all (SPADE with VGG16: 13 min of it).
  MTD, EfficientNet-Lite2 (the second command; SPADE with VGG16 would take over an hour here):
  PatchCore-10 % 91.70 / 77.08 / 71.40, 525 ms; PatchCore-1 % 90.20 / 74.73 / 71.80, 55 ms; PaDiM
  94.41 / 75.57 / 73.49, 27 ms; SPADE 72.14 / 75.43 / 74.64, 1,139 ms; MahalanobisAD 85.54, 15 ms
  (21 min 38 s). The paper (WideResNet-50, Tables 1-3 over MVTec AD): PatchCore above all three;
  on bottle every method is near the ceiling, and on MTD with these weights PaDiM's image AUROC is
  above PatchCore's.
"""
from configs import common
from configs.paper import set_paper


def get_config(arg=None):
  args = common.parse_arg(arg, dataset='mvtec', category='bottle',
                          backbones='efficientnet_lite2+vgg16', percentages='0.1+0.01',
                          methods='patchcore+padim+spade+mahalanobis')
  config = common.dataset_sweep_base(args)
  config.sweep.methods = tuple(args['methods'].split('+'))
  set_paper(config, 'comparison')
  config.lock()
  return config
