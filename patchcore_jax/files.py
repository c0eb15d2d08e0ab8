"""Atomic writes: every file and model directory appears whole or not at all.

A file is written under a temporary name beside its destination and renamed into place
(`write_text`, `write_json`, `save_png`, `save_npy`); a directory is filled under a temporary
name and renamed (`atomic_directory`). A reader never sees a half-written output.
"""
import contextlib
import json
import os
import shutil
import tempfile

import numpy as np
from PIL import Image


@contextlib.contextmanager
def _replacing(path, suffix=''):
  """Yields a temporary name beside `path` and renames it onto `path` when the block succeeds;
  on any failure (a full disk, an interrupt) the temporary file is removed."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f'{path}.tmp-{os.getpid()}{suffix}'
  try:
    with naming_errors(path):
      yield tmp
      os.replace(tmp, path)
  except BaseException:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    raise


@contextlib.contextmanager
def naming_errors(path):
  """An OSError without a file name (a `write` that found the disk full) raised in the block
  names `path`, so that the message says which output could not be written."""
  try:
    yield
  except OSError as error:
    if error.filename is not None or error.errno is None:
      raise
    raise type(error)(error.errno, error.strerror, path) from error


def write_text(path, text):
  """Writes `text` to `path` atomically (UTF-8; lone surrogates from file names are written back
  as the bytes they stand for)."""
  with _replacing(path) as tmp:
    with open(tmp, 'w', encoding='utf-8', errors='surrogateescape') as f:
      f.write(text)


def write_json(path, value):
  write_text(path, json.dumps(value, indent=2) + '\n')


def save_png(path, array):
  """Writes a uint8 image array as PNG atomically."""
  with _replacing(path, '.png') as tmp:
    Image.fromarray(array).save(tmp)


def save_npy(path, array):
  """Writes a numpy array as .npy atomically."""
  with _replacing(path, '.npy') as tmp:
    np.save(tmp, array)


@contextlib.contextmanager
def atomic_directory(directory):
  """Yields a new temporary folder beside `directory`; when the block succeeds the folder takes
  `directory`'s place by renames (an existing one is moved aside, then removed), so a reader sees
  the old contents or the new, never a mix. On failure the temporary folder is removed."""
  parent = os.path.dirname(directory)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.' + os.path.basename(directory) + '.tmp-', dir=parent)
  umask = os.umask(0)
  os.umask(umask)
  os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder.
  try:
    yield tmp
    if os.path.exists(directory):
      old = tmp.replace('.tmp-', '.old-')
      os.rename(directory, old)
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
