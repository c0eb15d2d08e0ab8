r"""PatchCore on MVTec AD.

  python launch.py --config=configs/mvtec.py:category=bottle,backbone=vgg16 \
      --config.data.root=/path/to/mvtec_ad --workdir=workdirs/mvtec_bottle_vgg16

Arguments (after the colon): category (any of the 15, or 'all'), backbone (default
efficientnet_lite2), percentage (coreset fraction, default 0.1).

Expected on bottle (measured on a 2-core CPU, see README): VGG16 PatchCore-10 % image AUROC 0.9960,
pixel AUROC 0.9697, AU-PRO 0.9038; EfficientNet-Lite2 PatchCore-10 % 1.0000 / 0.9866 / 0.9499.
"""
from configs import common
from patchcore_jax.data import MVTEC_CATEGORIES


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2', percentage=0.1)
  config = common.get_base_config(args['backbone'])
  config.data.name = 'mvtec'
  config.data.categories = (MVTEC_CATEGORIES if args['category'] == 'all'
                            else tuple(args['category'].split('+')))
  config.coreset.percentage = args['percentage']
  config.lock()
  return config
