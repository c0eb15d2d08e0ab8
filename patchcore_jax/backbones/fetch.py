r"""Downloads torchvision ImageNet checkpoints (for machines with internet) and converts them.

  python -m patchcore_jax.backbones.fetch wide_resnet50_2 [--cache_dir=DIR] [--url=URL]

The file goes to `<cache>/torchvision/<file name>`; torchvision encodes the first hex digits of the
file's sha256 in its name (`wide_resnet50_2-95faca4d.pth`), and the download is accepted only if
they match. It is then converted once to the `.npz` cache. Afterwards `load_backbone(name)` (and so
`--config=configs/mvtec.py:backbone=wide_resnet50_2`) finds it without `backbone.checkpoint`.
"""
import os
import re
import shutil
import sys
import tempfile
import urllib.request

from patchcore_jax.backbones import weights as weights_lib

_HASH_IN_NAME = re.compile(r'-([0-9a-f]{8,})\.(pth|pt)$')


def cached_checkpoint_path(url, cache_dir=''):
  """Where `fetch` stores the file of `url`."""
  return os.path.join(weights_lib.cache_dir(cache_dir), 'torchvision', os.path.basename(url))


def fetch(url, *, cache_dir='', progress=True):
  """Downloads `url` (http(s) or file://) into the cache, verifies its hash prefix; returns the path.

  Raises:
    ValueError: the file's sha256 does not start with the prefix in its name.
  """
  target = cached_checkpoint_path(url, cache_dir)
  if os.path.exists(target):
    return target
  os.makedirs(os.path.dirname(target), exist_ok=True)
  with tempfile.NamedTemporaryFile(dir=os.path.dirname(target), delete=False) as tmp:
    with urllib.request.urlopen(url) as response:  # nosec: user-requested download.
      total = int(response.headers.get('Content-Length') or 0)
      done = 0
      while True:
        chunk = response.read(1 << 20)
        if not chunk:
          break
        tmp.write(chunk)
        done += len(chunk)
        if progress and total:
          print(f'\r{os.path.basename(url)}: {done / total:.0%}', end='', file=sys.stderr)
    if progress and total:
      print(file=sys.stderr)
  match = _HASH_IN_NAME.search(os.path.basename(url))
  if match:
    digest = weights_lib.file_sha256(tmp.name)
    if not digest.startswith(match.group(1)):
      os.unlink(tmp.name)
      raise ValueError(f'{url}: sha256 {digest[:16]}... does not start with {match.group(1)}, '
                       'the prefix in its file name; the download is corrupt or not that file')
  shutil.move(tmp.name, target)
  return target


def main(argv):
  import argparse  # pylint: disable=g-import-not-at-top
  from patchcore_jax import backbones  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('name', choices=sorted(backbones.TORCHVISION_URLS))
  parser.add_argument('--cache_dir', default='')
  parser.add_argument('--url', default='', help='override the download address (e.g. a mirror)')
  args = parser.parse_args(argv)
  url = args.url or backbones.TORCHVISION_URLS[args.name]
  path = fetch(url, cache_dir=args.cache_dir)
  backbones.load_backbone(args.name, checkpoint=path, cache_dir=args.cache_dir,
                          fold=False)  # Converts and checks.
  print(path)


if __name__ == '__main__':
  main(sys.argv[1:])
