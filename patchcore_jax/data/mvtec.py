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


def present_categories(root):
  """The MVTec AD categories with a folder under `root`, in the official order."""
  found = tuple(c for c in MVTEC_CATEGORIES if os.path.isdir(os.path.join(root, c)))
  if not found:
    raise errors.UserError(f'no MVTec AD category folder under {root} (looked for '
                           f'{", ".join(MVTEC_CATEGORIES)})')
  return found


def resolve_categories(categories, root):
  """('all',) -> the categories present under `root`; any other tuple as it is."""
  return present_categories(root) if tuple(categories) == ('all',) else tuple(categories)
