"""A plain folder in MVTec AD's layout, under any name:

  <dir>/train/good/*                          defect-free training images
  <dir>/test/good/*                           defect-free test images
  <dir>/test/<defect>/*                       anomalous test images, any number of defect types
  <dir>/ground_truth/<defect>/<stem>_mask.png optional pixel masks
"""
import os

from patchcore_jax import errors
from patchcore_jax.data.common import IMAGE_EXTENSIONS, Sample, Split, list_images


def _find_mask(root, defect, path):
  stem = os.path.splitext(os.path.basename(path))[0]
  for ext in ('.png', '.bmp', '.tif', '.tiff', '.jpg'):
    candidate = os.path.join(_subfolder(root, 'ground_truth'), defect, stem + '_mask' + ext)
    if os.path.exists(candidate):
      return candidate
  return None


def _subfolder(directory, name):
  """directory/name, matching `name` case-insensitively ('Good', 'GOOD', 'Train' ...)."""
  if os.path.isdir(directory):
    for entry in sorted(os.listdir(directory)):
      if entry.lower() == name and os.path.isdir(os.path.join(directory, entry)):
        return os.path.join(directory, entry)
  return os.path.join(directory, name)


def folder_split(directory, *, name=None, relative_to=None):
  """Split of a folder in MVTec AD's layout; `name` defaults to the folder's name.

  Folder names 'train', 'test' and 'good' match case-insensitively ('test/Good' holds good
  images, not a defect type called 'Good').
  """
  directory = os.path.normpath(directory)
  if not os.path.isdir(directory):
    raise errors.UserError(f'no such folder: {directory}')
  name = name or os.path.basename(directory)
  train_dir = _subfolder(_subfolder(directory, 'train'), 'good')
  if not os.path.isdir(train_dir):
    raise errors.UserError(f'no training images: {train_dir} is missing (expected MVTec AD\'s '
                           'layout: train/good, test/good, test/<defect>)')
  train = [Sample(p, 0, 'good') for p in list_images(train_dir)]
  test_dir = _subfolder(directory, 'test')
  if not os.path.isdir(test_dir):
    raise errors.UserError(f'no test folder at {test_dir}')
  test = []
  for defect in sorted(os.listdir(test_dir)):
    if not os.path.isdir(os.path.join(test_dir, defect)):
      continue
    for path in list_images(os.path.join(test_dir, defect)):
      if defect.lower() == 'good':
        test.append(Sample(path, 0, 'good'))
      else:
        test.append(Sample(path, 1, defect, _find_mask(directory, defect, path)))
  if not train or not test:
    raise errors.UserError(f'{directory}: found {len(train)} training and {len(test)} test images '
                           f'(image files: {", ".join(IMAGE_EXTENSIONS)})')
  return Split(name, relative_to or os.path.dirname(directory), train, test)
