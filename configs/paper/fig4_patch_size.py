r"""Fig. 4 (left): neighbourhood (patch) size p = 1, 3, 5, 7, 9.

  python launch.py --config=configs/paper/fig4_patch_size.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/fig4_patch_size

One process; features are extracted once per patch size (the backbone runs each time: the
aggregation is inside the compiled embedding). PatchCore-1 % (greedy).

Arguments: category, backbone, percentage.
Paper: p = 3 is kept (smaller: too little context; larger: locality lost).
Ours on bottle, EfficientNet-Lite2, 2-core CPU (image AUROC / pixel AUROC / AU-PRO): p = 1 100.00 /
  98.33 / 95.49; 3: 100.00 / 98.51 / 94.95; 5: 99.76 / 98.43 / 92.31; 7: 99.68 / 97.75 / 86.55;
  9: 99.37 / 96.81 / 79.88 (2 min 14 s).
"""
from configs import common
from configs.paper import sweep_base


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2', percentage=0.01)
  config = sweep_base(args, percentages=(args['percentage'],), paper='fig4_patch_size')
  config.sweep.patch_sizes = (1, 3, 5, 7, 9)
  config.lock()
  return config
