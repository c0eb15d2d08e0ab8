"""Configs that rerun the paper's experiments (job 'sweep'; README "Paper experiments")."""
from configs import common


def sweep_base(args, *, percentages, paper, subsamplers=('greedy',)):
  """The unlocked config every MVTec paper sweep starts from: `args['backbone']`, the '+'-joined
  `args['category']` ('all': every category under data.root), the greedy coreset at
  `percentages`, the paper's statements `paper` (sweep.PAPER) in report.md."""
  config = common.get_base_config(args['backbone'])
  config.job = 'sweep'
  config.data.name = 'mvtec'
  config.data.categories = tuple(args['category'].split('+'))
  config.sweep = common.sweep_config()
  config.sweep.subsamplers = tuple(subsamplers)
  config.sweep.percentages = tuple(percentages)
  config.sweep.paper = paper
  return config
