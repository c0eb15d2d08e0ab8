"""MVTec AD in its official layout: <root>/<category>/{train/good, test/<defect>,
ground_truth/<defect>/<stem>_mask.png}."""
import os

from patchcore_jax import errors
from patchcore_jax.data.folder import folder_split

MVTEC_CATEGORIES = ('bottle', 'cable', 'capsule', 'carpet', 'grid', 'hazelnut', 'leather',
                    'metal_nut', 'pill', 'screw', 'tile', 'toothbrush', 'transistor', 'wood',
                    'zipper')


def mvtec_split(root, category):
  """Split of one MVTec AD category; paths in outputs are relative to `root`."""
  if category not in MVTEC_CATEGORIES:
    raise errors.UserError(f'unknown MVTec AD category {category!r}; known: {", ".join(MVTEC_CATEGORIES)}')
  directory = os.path.join(root, category)
  if not os.path.isdir(directory):
    raise errors.UserError(f'MVTec AD category {category!r} not found at {directory}')
  return folder_split(directory, name=category, relative_to=root)
