r"""PatchCore on your own images, in MVTec AD's layout under any folder name:

  <dir>/train/good/*, <dir>/test/good/*, <dir>/test/<defect>/*,
  optional masks <dir>/ground_truth/<defect>/<stem>_mask.png

  python launch.py --config=configs/folder.py --config.data.root=<dir> --workdir=workdirs/mine

Results are reported under the folder's name. Without masks, pixel AUROC and AU-PRO are null.
For non-square images add --config.data.transform=resize (no centre crop).
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, backbone='efficientnet_lite2', percentage=0.1)
  config = common.get_base_config(args['backbone'])
  config.data.name = 'folder'
  config.data.categories = ()
  config.coreset.percentage = args['percentage']
  config.lock()
  return config
