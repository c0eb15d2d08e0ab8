"""The quickstart notebook runs top to bottom, and the README's Python section runs."""
import os
import re

import nbformat
import numpy as np
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quickstart_notebook_runs(tmp_path):
  path = os.path.join(ROOT, 'patchcore_jax', 'colab', 'quickstart.ipynb')
  notebook = nbformat.read(path, as_version=4)
  client = NotebookClient(notebook, timeout=600, kernel_name='python3',
                          resources={'metadata': {'path': ROOT}})
  client.execute()  # Raises CellExecutionError, with the cell and its traceback, if a cell fails.
  outputs = '\n'.join(o.get('text', '') for cell in notebook.cells if cell.cell_type == 'code'
                      for o in cell.get('outputs', []))
  image_auroc = float(re.search(r'image AUROC ([0-9.]+)', outputs).group(1))
  assert image_auroc >= 0.9, outputs
  difference = float(re.search(r'largest relative difference to predict: ([0-9.e+-]+)',
                               outputs).group(1))
  assert difference <= 1e-5, outputs


def test_readme_python_section_runs(tmp_path, monkeypatch):
  with open(os.path.join(ROOT, 'README.md')) as f:
    readme = f.read()
  section = readme[readme.index('\n## Python\n'):]
  code = re.search(r'```python\n(.*?)```', section, re.S).group(1)
  monkeypatch.chdir(tmp_path)
  namespace = {}
  exec(compile(code, 'README.md', 'exec'), namespace)  # pylint: disable=exec-used
  prediction, labels = namespace['prediction'], namespace['labels']
  assert namespace['pc'].metrics.image_auroc(labels, prediction.image_scores) >= 0.95
  assert np.mean(prediction.anomalous == labels) >= 0.85
  assert os.path.exists(tmp_path / 'models' / 'weave' / 'model.json')
  assert os.path.exists(tmp_path / 'exported' / 'weave' / 'patchcore_exported.py')
