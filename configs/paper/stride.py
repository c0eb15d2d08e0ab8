r"""Sec. 4.4.2: neighbourhood stride s = 1, 2, 3.

  python launch.py --config=configs/paper/stride.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/stride

A stride s keeps every s-th neighbourhood: s x s fewer patches (and a coarser anomaly map).
Features once per stride; PatchCore-10 % (greedy).

Arguments: category, backbone, percentage.
Paper: 97.6 and 96.8 image AUROC at s = 2 and 3 (mean over MVTec AD, WideResNet-50).
Ours on bottle, EfficientNet-Lite2, 2-core CPU (image AUROC / pixel AUROC / AU-PRO): s = 1 100.00 /
  98.67 / 95.07; 2: 100.00 / 98.33 / 93.19; 3: 100.00 / 98.34 / 92.86 (1 min 22 s).
"""
from configs import common
from configs.paper import sweep_base


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2', percentage=0.1)
  config = sweep_base(args, percentages=(args['percentage'],), paper='stride')
  config.sweep.strides = (1, 2, 3)
  config.lock()
  return config
