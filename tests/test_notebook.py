"""The quickstart notebook runs top to bottom (the README's example: tests/test_layout.py)."""
import os
import re

import nbformat
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
