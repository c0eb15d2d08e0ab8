r"""The embedded default: PatchCore on a procedurally generated dataset, no download needed.

  python launch.py --config=configs/demo.py --workdir=workdirs/demo

Generates two small categories ('weave' fabric and 'tiles', 60 training and 51 test images each,
with pixel masks) under <workdir>/data unless --config.data.root is given, then runs
EfficientNet-Lite2 (ImageNet weights from the installed package) with a 10 % coreset.
Arguments: category (weave, tiles or weave+tiles), backbone, percentage.

Expected (image AUROC / pixel AUROC / AU-PRO, measured on a 2-core CPU, see docs/results.md):
  weave 1.0000 / 0.9952 / 0.9847, tiles 1.0000 / 0.9971 / 0.9882; under a minute in all.
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, category='weave+tiles', backbone='efficientnet_lite2',
                          percentage=0.1)
  config = common.get_base_config(args['backbone'])
  config.data.name = 'synthetic'
  config.data.categories = tuple(args['category'].split('+'))
  config.data.transform = 'resize'  # The generated images are square; keep defects at the border.
  config.coreset.percentage = args['percentage']
  config.lock()
  return config
