"""`pip install .` gives an importable package with the public API and the notebook."""
import os
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_installs_and_imports_outside_the_repository(tmp_path):
  source = tmp_path / 'source'  # A copy, so the build leaves nothing in the checkout.
  os.makedirs(source)
  for name in ('pyproject.toml', 'README.md'):
    shutil.copy(os.path.join(ROOT, name), source / name)
  shutil.copytree(os.path.join(ROOT, 'patchcore_jax'), source / 'patchcore_jax',
                  ignore=shutil.ignore_patterns('__pycache__'))
  build = subprocess.run(
      [sys.executable, '-m', 'pip', 'wheel', '--no-deps', '--no-build-isolation', '-q',
       str(source), '-w', str(tmp_path / 'wheel')], capture_output=True, text=True, timeout=300)
  assert build.returncode == 0, build.stderr[-3000:]
  (wheel,) = os.listdir(tmp_path / 'wheel')
  install = subprocess.run(
      [sys.executable, '-m', 'pip', 'install', '-q', '--no-deps', '--target',
       str(tmp_path / 'site'), str(tmp_path / 'wheel' / wheel)], capture_output=True, text=True,
      timeout=300)
  assert install.returncode == 0, install.stderr[-3000:]
  script = ('import importlib.resources, patchcore_jax as pc\n'
            'assert pc.__file__.startswith(%r), pc.__file__\n'
            'names = [n for n in ("fit", "predict", "save", "load", "export", "PatchCore",\n'
            '         "backbones", "features", "coreset", "knn", "scoring", "metrics")\n'
            '         if not hasattr(pc, n)]\n'
            'assert not names, names\n'
            'nb = importlib.resources.files("patchcore_jax") / "colab" / "quickstart.ipynb"\n'
            'assert nb.is_file()\n'
            'print(pc.__version__)\n') % str(tmp_path / 'site')
  proc = subprocess.run([sys.executable, '-c', script], cwd=str(tmp_path), capture_output=True,
                        text=True, timeout=300, env={**os.environ, 'PYTHONPATH': str(tmp_path / 'site')})
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == wheel.split('-')[1]


def test_accelerator_extras_and_test_processes_share_a_device():
  import tomllib  # pylint: disable=g-import-not-at-top
  with open(os.path.join(ROOT, 'pyproject.toml'), 'rb') as f:
    extras = tomllib.load(f)['project']['optional-dependencies']
  with open(os.path.join(ROOT, 'requirements.txt')) as f:
    jax_pin = next(line.split()[0] for line in f if line.startswith('jax=='))
  assert extras['cuda12'] == [jax_pin.replace('jax', 'jax[cuda12]')]
  assert extras['cuda13'] == [jax_pin.replace('jax', 'jax[cuda13]')]
  # Every test process, and the processes the tests start, allocate device memory as needed.
  child = subprocess.run([sys.executable, '-c', 'import os; print(os.environ.get('
                          '"XLA_PYTHON_CLIENT_PREALLOCATE"))'], capture_output=True, text=True,
                         check=True)
  assert os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] == child.stdout.strip() == 'false'
