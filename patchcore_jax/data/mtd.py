"""Magnetic Tile Defects (Huang et al., 2018) with the shared protocol.

Sorted `MT_Free/Imgs/*.jpg` names: index i % 5 == 0 -> test (good), else train. Every tile of
MT_Blowhole, MT_Break, MT_Crack, MT_Fray and MT_Uneven is an anomalous test image; its mask is
`NAME.png` beside `NAME.jpg` (soft edges: defective where > 127).
"""
import glob
import os

from patchcore_jax import errors
from patchcore_jax.data.common import Sample, Split

DEFECTS = ('MT_Blowhole', 'MT_Break', 'MT_Crack', 'MT_Fray', 'MT_Uneven')


def mtd_split(root):
  free = sorted(glob.glob(os.path.join(root, 'MT_Free', 'Imgs', '*.jpg')))
  if not free:
    raise errors.UserError(f'no MT_Free/Imgs/*.jpg under {root} (expected the MTD release layout)')
  train = [Sample(p, 0, 'good') for i, p in enumerate(free) if i % 5 != 0]
  test = [Sample(p, 0, 'good', p[:-4] + '.png') for i, p in enumerate(free) if i % 5 == 0]
  for defect in DEFECTS:
    for path in sorted(glob.glob(os.path.join(root, defect, 'Imgs', '*.jpg'))):
      mask = path[:-4] + '.png'
      test.append(Sample(path, 1, defect, mask if os.path.exists(mask) else None))
  return Split('mtd', os.path.dirname(os.path.normpath(root)), train, test)
