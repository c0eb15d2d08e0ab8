r"""Fig. 4 (left): neighbourhood (patch) size p = 1, 3, 5, 7, 9.

  python launch.py --config=configs/paper/fig4_patch_size.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/fig4_patch_size

One process; features are extracted once per patch size (the backbone runs each time: the
aggregation is inside the compiled embedding). PatchCore-1 % (greedy).

Arguments: category, backbone, percentage.
Paper: p = 3 is kept (smaller: too little context; larger: locality lost).
Ours on bottle, 2-core CPU: README "Paper experiments".
"""
from configs import common


def get_config(arg=None):
  args = common.parse_arg(arg, category='bottle', backbone='efficientnet_lite2', percentage=0.01)
  config = common.get_base_config(args['backbone'])
  config.job = 'sweep'
  config.data.name = 'mvtec'
  config.data.categories = tuple(args['category'].split('+'))
  config.sweep = common.sweep_config()
  config.sweep.subsamplers = ('greedy',)
  config.sweep.percentages = (args['percentage'],)
  config.sweep.patch_sizes = (1, 3, 5, 7, 9)
  config.sweep.paper = 'fig4_patch_size'
  config.lock()
  return config
