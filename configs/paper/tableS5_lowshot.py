r"""Table S5: low-shot PatchCore with 1, 2, 5, 10, 16, 20 and 50 training images, 3 seeds.

  python launch.py --config=configs/paper/tableS5_lowshot.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/lowshot

The features of every training image are extracted once; each (shots, seed) draws that many
training images without replacement (numpy's default_rng(seed)) and builds its bank from their
patches, then the greedy coreset (PatchCore-10 %). report.md: every run, and the mean ± std over
seeds per shot count.

Arguments: category, backbone, percentage, seeds (the number of seeds: 0 .. seeds-1).
Paper: supplementary Table S5 (mean over the 15 categories, WideResNet-50).
Ours on bottle, EfficientNet-Lite2, 2-core CPU, image AUROC mean ± std over 3 seeds: 1 shot
  97.46 ± 1.36, 2: 99.63 ± 0.20, 5 and more: 100.00 ± 0.00 (AU-PRO 88.14 ± 1.28 at 1 shot, 94.65
  at 5, 95.16 at 16); 1 min 44 s for the 21 runs (docs/paper.md).
"""
from configs import common
from configs.paper import sweep_base


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2', percentage=0.1,
                          seeds=3)
  config = sweep_base(args, percentages=(args['percentage'],), paper='lowshot')
  config.sweep.shots = (1, 2, 5, 10, 16, 20, 50)
  config.sweep.seeds = tuple(range(args['seeds']))
  config.lock()
  return config
