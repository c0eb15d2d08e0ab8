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
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, dataset='mvtec', category='bottle',
                          backbones='efficientnet_lite2+vgg16', percentages='0.1+0.01',
                          methods='patchcore+padim+spade+mahalanobis')
  names = tuple(args['backbones'].split('+'))
  config = common.get_base_config(names[0])
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
  config.sweep = common.sweep_config()
  config.sweep.methods = tuple(args['methods'].split('+'))
  config.sweep.backbones = names
  config.sweep.percentages = tuple(float(p) for p in args['percentages'].split('+'))
  config.sweep.seeds = ()
  config.lock()
  return config
