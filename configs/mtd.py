r"""PatchCore on Magnetic Tile Defects (MTD).

  python launch.py --config=configs/mtd.py:backbone=vgg16 --config.coreset.percentage=0.01 \
      --config.data.root=/path/to/mtd --workdir=workdirs/mtd_vgg16

Protocol: sorted MT_Free names, index % 5 == 0 -> test (191 good), the rest train (761); all 392
defective tiles test. Tiles are not square: they are resized to 224 x 224 without the centre crop
(the crop would cut the defect out of 162 of the 392 defective tiles).

Expected (image AUROC / pixel AUROC / AU-PRO, measured on a 2-core CPU, see docs/results.md):
  backbone=vgg16,percentage=0.01              0.8889 / 0.7187 / 0.7194  (official: 0.8940 / 0.7158 / 0.7276)
  backbone=efficientnet_lite2,percentage=0.01 0.9020 / 0.7473 / 0.7180
The bank (596,624 x 1024, 2.3 GiB) streamed to a temporary file instead of memory: add
  --config.coreset.memory_budget_gb=0   -> the same metrics, less peak memory (docs/scale.md).
Through TFDS (built once as magnetic_tile_defects, array_record): add --config.data.source=tfds
  -> the same metrics and scores (measured: efficientnet_lite2 at 0.01; building took 0.50 s).
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, backbone='efficientnet_lite2', percentage=0.1)
  config = common.get_base_config(args['backbone'])
  config.data.name = 'mtd'
  config.data.categories = ('mtd',)
  config.data.transform = 'resize'
  config.coreset.percentage = args['percentage']
  config.lock()
  return config
