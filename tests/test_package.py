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
