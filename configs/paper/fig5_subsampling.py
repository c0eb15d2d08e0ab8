r"""Fig. 5: greedy coreset, random subsampling and learned basis proxies at 25, 10, 1, 0.1 %.

  python launch.py --config=configs/paper/fig5_subsampling.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/fig5

One process: the features of every training and test image are extracted once, the greedy
coreset runs once to 25 % (its prefixes are the 10, 1 and 0.1 % coresets), a seeded permutation
gives every random size, and the proxies (Eq. 8, Adam via optax; softmin weights, or the printed
sign with proxies_sign=printed, or both) are learned per size. Also the 100 % bank, for the
memory-bank usage statistic (the share of bank rows that are some test patch's nearest neighbour).
Writes sweep.json, report.md (ours beside the paper's statements), plots/.

Arguments: category (MVTec; '+'-joined for several), backbone, proxy_steps, proxies_sign
(softmin | printed | both).
Measured on bottle, EfficientNet-Lite2, 2-core CPU (docs/paper.md): image AUROC
  at 25 / 10 / 1 / 0.1 %: greedy 1.0000 / 1.0000 / 1.0000 / 0.9976, random 1.0000 / 1.0000 /
  1.0000 / 0.9603, proxies (softmin) 1.0000 / 1.0000 / 0.9992 / 0.8675; bank usage 29.3 % at
  100 %, 96.3 % for the 1 % coreset (paper: < 30 %, ~95 %); all 17 variants in one process (time:
  docs/paper.md).
"""
from configs import common
from configs.paper import sweep_base


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2', proxy_steps=200,
                          proxies_sign='both')
  config = sweep_base(args, percentages=(1.0, 0.25, 0.1, 0.01, 0.001), paper='fig5',
                      subsamplers=('greedy', 'random', 'proxies'))
  config.sweep.proxies.steps = args['proxy_steps']
  config.sweep.proxies.sign = args['proxies_sign']
  config.lock()
  return config
