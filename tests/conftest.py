"""Shared test helpers.

Tests that need the real data read it from $PATCHCORE_SHARED (the `shared` folder holding
data/ and reference/); they skip with that reason when it is unset. CI sets it.
"""
import os

import pytest


def shared_path(*parts):
  """Path under $PATCHCORE_SHARED, or skip the test saying why."""
  root = os.environ.get('PATCHCORE_SHARED')
  if not root:
    pytest.skip('needs the real data: set PATCHCORE_SHARED to the folder holding data/ and '
                'reference/ (CI sets it)')
  path = os.path.join(root, *parts)
  if not os.path.exists(path):
    pytest.fail(f'PATCHCORE_SHARED is set but {path} does not exist')
  return path


def pytest_collection_modifyitems(items):
  """The real-data tests run longest: start them first, so that with two workers (pytest -n 2)
  neither is left running them alone at the end."""
  items.sort(key=lambda item: 0 if item.path.name == 'test_real_data.py' else 1)
