"""A plain folder in MVTec AD's layout, under any name:

  <dir>/train/good/*                          defect-free training images
  <dir>/test/good/*                           defect-free test images
  <dir>/test/<defect>/*                       anomalous test images, any number of defect types
  <dir>/ground_truth/<defect>/<stem>_mask.png optional pixel masks
"""
import os

from patchcore_jax.data.common import Sample, Split, list_images


def _find_mask(root, defect, path):
  stem = os.path.splitext(os.path.basename(path))[0]
  for ext in ('.png', '.bmp', '.tif', '.tiff', '.jpg'):
    candidate = os.path.join(root, 'ground_truth', defect, stem + '_mask' + ext)
    if os.path.exists(candidate):
      return candidate
  return None


def folder_split(directory, *, name=None, relative_to=None):
  """Split of a folder in MVTec AD's layout; `name` defaults to the folder's name."""
  directory = os.path.normpath(directory)
  name = name or os.path.basename(directory)
  train = [Sample(p, 0, 'good') for p in list_images(os.path.join(directory, 'train', 'good'))]
  test_dir = os.path.join(directory, 'test')
  if not os.path.isdir(test_dir):
    raise FileNotFoundError(f'no test folder at {test_dir}')
  test = []
  for defect in sorted(os.listdir(test_dir)):
    if not os.path.isdir(os.path.join(test_dir, defect)):
      continue
    for path in list_images(os.path.join(test_dir, defect)):
      if defect == 'good':
        test.append(Sample(path, 0, 'good'))
      else:
        test.append(Sample(path, 1, defect, _find_mask(directory, defect, path)))
  if not train or not test:
    raise ValueError(f'{directory}: found {len(train)} training and {len(test)} test images')
  return Split(name, relative_to or os.path.dirname(directory), train, test)
