"""The house: a library that knows nothing of configs, jobs on top of it, one way down.

- No library module (outside patchcore_jax/jobs/) imports ml_collections or absl.flags, takes a
  ConfigDict or imports a job; no job imports another job.
- The README's Python example (fit, predict, save, load, export) runs with ml_collections made
  unimportable, in a fresh process.
"""
import ast
import json
import os
import re
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, 'patchcore_jax')
JOBS = ('experiment', 'predict', 'sweep', 'benchmark', 'gpu_check')


def _modules():
  """{module name: parsed source} of every module of the package."""
  out = {}
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py'):
        path = os.path.join(folder, name)
        module = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.')
        module = module[:-len('.__init__')] if module.endswith('.__init__') else module
        with open(path) as f:
          out[module] = f.read()
  return out


def _imports(source):
  """Every module name an import statement of `source` names (from-imports: module.name too)."""
  names = set()
  for node in ast.walk(ast.parse(source)):
    if isinstance(node, ast.Import):
      names.update(alias.name for alias in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module:
      names.add(node.module)
      names.update(f'{node.module}.{alias.name}' for alias in node.names)
  return names


def test_the_imports_of_each_module_helper_sees_them():
  source = 'import a.b\nfrom patchcore_jax.jobs import sweep\nfrom x import y as z\n'
  assert _imports(source) == {'a.b', 'patchcore_jax.jobs', 'patchcore_jax.jobs.sweep', 'x', 'x.y'}


def test_the_library_reads_no_config_and_imports_no_job():
  modules = _modules()
  library = {m: s for m, s in modules.items() if not m.startswith('patchcore_jax.jobs')}
  assert 'patchcore_jax.patchcore' in library and len(library) > 20
  for module, source in library.items():
    imports = _imports(source)
    assert not {i for i in imports if i.split('.')[0] == 'ml_collections'}, module
    assert 'absl.flags' not in imports, module
    assert not {i for i in imports if i.startswith('patchcore_jax.jobs')}, module
    assert not re.search(r'ConfigDict|to_json_best_effort|\.unlocked\(\)', source), module


def test_no_job_imports_another_job():
  modules = _modules()
  for job in JOBS:
    imports = _imports(modules[f'patchcore_jax.jobs.{job}'])
    others = {i for i in imports for other in JOBS if other != job
              and i == f'patchcore_jax.jobs.{other}'}
    assert not others, (job, others)


def test_every_job_is_dispatched_and_has_run():
  from patchcore_jax import jobs  # pylint: disable=g-import-not-at-top
  modules = _modules()
  assert sorted(jobs.JOBS.values()) == sorted(JOBS)
  for job in JOBS:
    assert re.search(r'^def run\(config, workdir\):', modules[f'patchcore_jax.jobs.{job}'], re.M)


def test_readme_python_example_runs_without_ml_collections(tmp_path):
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  section = readme[readme.index('\n## Python\n'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  script = '\n'.join([
      'import sys',
      "sys.modules['ml_collections'] = None  # import ml_collections now raises ImportError",
      code,
      'import json',
      "assert 'ml_collections' not in [m for m in sys.modules if sys.modules[m] is not None]",
      'print(json.dumps({"scores": [float(s) for s in prediction.image_scores],',
      '                  "anomalous": [bool(a) for a in prediction.anomalous],',
      '                  "labels": [int(x) for x in labels]}))',
  ])
  proc = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), capture_output=True,
                        text=True, timeout=900,
                        env={**os.environ, 'PYTHONPATH': ROOT, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  from patchcore_jax import metrics  # pylint: disable=g-import-not-at-top
  labels = np.array(out['labels'])
  assert metrics.image_auroc(labels, np.array(out['scores'])) >= 0.95
  assert np.mean(np.array(out['anomalous']) == labels) >= 0.85
  assert os.path.exists(tmp_path / 'models' / 'weave' / 'model.json')
  assert os.path.exists(tmp_path / 'exported' / 'weave' / 'patchcore_exported.py')
