r"""Runs a job (patchcore_jax.jobs) as a config says: experiments, predictions, sweeps, benchmarks.

  python launch.py --config=configs/demo.py --workdir=workdirs/demo
  python launch.py --config=configs/mvtec.py:category=bottle,backbone=vgg16 \
      --config.data.root=/path/to/mvtec_ad --workdir=workdirs/bottle
  python launch.py --config=configs/predict.py --config.model=workdirs/bottle/models/bottle \
      --config.images=/path/to/images --workdir=workdirs/predictions
  python launch.py --config=configs/paper/table1_mvtec.py --config.data.root=/path/to/mvtec_ad \
      --workdir=workdirs/table1
  python launch.py --config=configs/benchmark.py:backbone=wide_resnet50_2 --workdir=workdirs/bench

Each config's docstring holds its exact command and expected result; configs/common.py documents
every field, and any field can be overridden (--config.coreset.percentage=0.01).

A user error (bad path, unreadable or edited file, bad config file, key or value) ends with one
line, `error: <message>`, and exit status 2, without a traceback; the predict job exits 1 when
some images could not be read. SIGTERM / SIGINT stop a job cleanly (status.json 'interrupted')
with exit status 143 / 130.
"""
import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from patchcore_jax import errors
from patchcore_jax import jobs
from patchcore_jax.jobs import config as config_lib
from patchcore_jax.jobs import workdir as workdir_lib

_CONFIG = config_flags.DEFINE_config_file('config', None, 'Config file (path[:arg]).',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'Directory for all outputs.')
flags.mark_flags_as_required(['config', 'workdir'])


def _user_error(message):
  print(f'error: {message}', file=sys.stderr)
  sys.exit(2)


def _describe(error):
  """One line for an exception raised by a config file or an override."""
  while error.args and isinstance(error.args[0], BaseException):
    error = error.args[0]  # ml_collections wraps a KeyError in an AttributeError.
  text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  if 'Traceback (most recent call last)' in text:  # A config file's own error, quoted whole.
    head, _, trace = text.partition('Traceback (most recent call last)')
    text = head.rstrip(' :\n') + ': ' + trace.strip().splitlines()[-1]
  return ' '.join(text.split())


def _parse_flags(argv):
  """absl's flag parsing; a bad flag, config file, config argument or override is a user error."""
  try:
    return flags.FLAGS(argv)
  except Exception as error:  # pylint: disable=broad-except
    _user_error(f'bad command line or config ({type(error).__name__}): {_describe(error)}')


def main(argv):
  del argv
  try:
    config = _CONFIG.value
    job = config.get('job', 'patchcore')  # A config file that failed to load raises here.
  except Exception as error:  # pylint: disable=broad-except
    _user_error(f'cannot load the config ({type(error).__name__}): {_describe(error)}')
  if job not in jobs.JOBS:
    _user_error(f'config.job={job!r} is not allowed: must be one of {tuple(jobs.JOBS)}')
  try:
    config_lib.join_processes(config)  # Before any device is used.
  except errors.UserError as error:
    _user_error(error)
  logging.info('JAX %s, devices: %s', jax.__version__, jax.devices())
  logging.info('config:\n%s', config)
  try:
    result = jobs.run(config, _WORKDIR.value)
  except errors.UserError as error:
    logging.error('%s', error)
    _user_error(error)
  except workdir_lib.Interrupted as error:
    print(error, file=sys.stderr)
    sys.exit(error.exit_status)
  sys.exit(jobs.exit_status(config, result))


if __name__ == '__main__':
  app.run(main, flags_parser=_parse_flags)
