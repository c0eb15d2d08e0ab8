r"""Table 6: Magnetic Tile Defects (MTD).

  python launch.py --config=configs/paper/table6_mtd.py --config.data.root=/path/to/mtd \
      --workdir=workdirs/table6

The protocol of configs/mtd.py (sorted MT_Free names, index % 5 == 0 -> test; tiles resized to
224 x 224 without the centre crop), as a sweep: features once, the greedy coreset once to the
largest percentage. For one fitted model per run (saved, with scores and overlays), use
configs/mtd.py instead.

Arguments: backbone, percentages ('+'-joined fractions, default 0.01).
Paper: image AUROC 97.9 (WideResNet-50).
Ours, EfficientNet-Lite2, PatchCore-1 %, 2-core CPU: 90.20 / 74.73 / 71.80 (image AUROC / pixel
  AUROC / AU-PRO), 99 of 583 misclassified, as configs/mtd.py (1 min 39 s).
"""
from configs import common
from configs.paper import set_paper


def get_config(arg=None):
  args = common.parse_arg(arg, backbone='efficientnet_lite2', percentages='0.01')
  config = common.get_base_config(args['backbone'])
  config.job = 'sweep'
  config.data.name = 'mtd'
  config.data.categories = ('mtd',)
  config.data.transform = 'resize'
  config.sweep = common.sweep_config()
  config.sweep.subsamplers = ('greedy',)
  config.sweep.percentages = tuple(float(p) for p in args['percentages'].split('+'))
  config.sweep.overlays = 8
  set_paper(config, 'table6')
  config.lock()
  return config
