r"""Runs PatchCore (or, for configs with job='benchmark', the benchmark) as a config says.

  python launch.py --config=configs/demo.py --workdir=workdirs/demo
  python launch.py --config=configs/mvtec.py:category=bottle,backbone=vgg16 \
      --config.data.root=/path/to/mvtec_ad --workdir=workdirs/bottle
  python launch.py --config=configs/benchmark.py:backbone=wide_resnet50_2 --workdir=workdirs/bench
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from patchcore_jax import benchmark  # pylint: disable=g-import-not-at-top
from patchcore_jax import experiment  # pylint: disable=g-import-not-at-top

_JOBS = {'patchcore': experiment.run, 'benchmark': benchmark.run}

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for all outputs.')
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  config = _CONFIG.value
  job = config.get('job', 'patchcore')
  if job == 'patchcore' and config.data.name == 'synthetic' and not config.data.root:
    with config.unlocked():
      config.data.root = os.path.join(_WORKDIR.value, 'data')
  logging.info('JAX %s, devices: %s', jax.__version__, jax.devices())
  logging.info('config:\n%s', config)
  _JOBS[job](config, _WORKDIR.value)


if __name__ == '__main__':
  app.run(main)
