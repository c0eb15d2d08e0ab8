r"""Fig. 4 (right): feature hierarchy levels 1, 2, 3, 1+2, 2+3, 1+2+3.

  python launch.py --config=configs/paper/fig4_hierarchies.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/fig4_hierarchies

Level l is the backbone's last stage at stride 2 ** (l + 1) (backbones.level_stages: a ResNet's
layer1 / layer2 / layer3; EfficientNet-Lite2's blocks.3 / blocks.6 / blocks.14); the features
of several levels are aggregated on the shallowest one's grid, so banks with level 1 are 4x
larger (56 x 56 patches per image at 224 px). PatchCore-1 % (greedy).

Arguments: category, backbone, percentage.
Paper: levels 2+3 are kept (the default everywhere).
Ours on bottle, EfficientNet-Lite2, 2-core CPU (image AUROC / pixel AUROC / AU-PRO): 1: 99.21 / 96.40 /
  92.01; 2: 100.00 / 98.29 / 94.86; 3: 100.00 / 97.17 / 88.84; 1+2: 99.92 / 97.55 / 94.02; 2+3:
  100.00 / 98.51 / 94.95; 1+2+3: 99.92 / 98.20 / 95.18 (3 min 19 s, peak RSS 7.0 GB).
"""
from configs import common
from configs.paper import sweep_base


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2', percentage=0.01)
  config = sweep_base(args, percentages=(args['percentage'],), paper='fig4_hierarchies')
  config.sweep.hierarchies = ('1', '2', '3', '1+2', '2+3', '1+2+3')
  config.lock()
  return config
