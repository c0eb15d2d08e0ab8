"""Configs that rerun the paper's experiments (job 'sweep'; docs/paper.md).

statements.json holds what the paper reports for each experiment, by key; a config names its key
in `sweep.paper` and carries the lines in `sweep.paper_statements`, which report.md prints beside
our numbers.
"""
import json
import os

from configs import common

STATEMENTS = os.path.join(os.path.dirname(__file__), 'statements.json')


def statements(key):
  """The paper's statements for experiment `key` (a key of statements.json), as a tuple."""
  with open(STATEMENTS) as f:
    table = json.load(f)
  if key not in table or key.startswith('_'):
    raise ValueError(f'no paper statements {key!r}; known: '
                     f'{sorted(k for k in table if not k.startswith("_"))}')
  return tuple(table[key])


def set_paper(config, key):
  """Names the paper's experiment `key` in config.sweep and carries its statements."""
  config.sweep.paper = key
  config.sweep.paper_statements = statements(key)


def sweep_base(args, *, percentages, paper, subsamplers=('greedy',)):
  """The unlocked config every MVTec paper sweep starts from: `args['backbone']`, the '+'-joined
  `args['category']` ('all': every category under data.root), the greedy coreset at
  `percentages`, the paper's statements of `paper` (statements.json) in report.md."""
  config = common.get_base_config(args['backbone'])
  config.job = 'sweep'
  config.data.name = 'mvtec'
  config.data.categories = tuple(args['category'].split('+'))
  config.sweep = common.sweep_config()
  config.sweep.subsamplers = tuple(subsamplers)
  config.sweep.percentages = tuple(percentages)
  set_paper(config, paper)
  return config
