"""The jobs: what `launch.py` runs from a config, and the only code that reads a ConfigDict.

  experiment  PatchCore on every category of a dataset, from images to metrics (job 'patchcore')
  predict     scores new images with a saved model
  sweep       many PatchCore variants in one process (the paper's tables and figures)
  benchmark   every stage timed under jit and eagerly, against the machine's limits
  gpu_check   the accelerator paths proved and timed on a GPU in minutes

Each is a module with `run(config, workdir)`. `config` (the config boundary) turns a ConfigDict
into the library's records; `workdir` is the workdir contract (status.json, one run per
workdir); `charts` and `sweep_report` draw and write the jobs' reports. No job imports another.
"""
import importlib

# config.job -> the module that runs it.
JOBS = {'patchcore': 'experiment', 'predict': 'predict', 'sweep': 'sweep',
        'benchmark': 'benchmark', 'gpu_check': 'gpu_check'}


def run(config, workdir):
  """Runs the job `config.job` names (default 'patchcore') on `config`; returns its result."""
  module = importlib.import_module(f'{__name__}.{JOBS[config.get("job", "patchcore")]}')
  return module.run(config, workdir)


def exit_status(config, result):
  """The process exit status of a job's result: the predict job's 'exit_status' (1 when some
  images could not be read), else 0."""
  return result['exit_status'] if config.get('job') == 'predict' else 0
