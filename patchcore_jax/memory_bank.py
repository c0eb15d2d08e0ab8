"""The memory bank: building it from patch features, storing it (in memory or on disk), and
subsampling it to a coreset.

  bank = build_memory_bank(embed_fn, batches, num_images=N)     # [N * h * w, D] host array
  prepared, indices = subsample(bank, percentage=0.1, key=key)   # knn.Bank of the coreset

`coreset.coreset_size` is the one rule for how many rows a percentage keeps. A host (numpy)
bank stays on the host: only its projection and the selected rows go to the device, so memory
holds one full-precision copy of the bank plus its projection. A bank larger than a memory budget streams
to an unlinked temporary file (`DiskBank`): memory then holds its projection, one block and the
selected rows.
"""
import os
import tempfile
import time

from absl import logging
import jax.numpy as jnp
import numpy as np

from patchcore_jax import coreset
from patchcore_jax import errors
from patchcore_jax import knn
from patchcore_jax import sharded
from patchcore_jax import timing


def check_bank_size(settings, *, num_images, grid, names=None):
  """Raises errors.UserError, before any image is read, when the coreset would keep no patch or
  fewer patches than `settings.k` neighbours; `grid` is the (h, w) feature grid of one image;
  `names` maps a setting to how messages name it. Returns the memory bank's size."""
  label = lambda field: (names or {}).get(field, field)
  h, w = grid
  rows = num_images * h * w
  kept = coreset.coreset_size(rows, settings.percentage)
  if kept < 1:
    raise errors.UserError(
        f'{label("percentage")} = {settings.percentage} of {rows} patches ({num_images} images '
        f'x {h} x {w}) keeps none: raise it')
  if settings.k > kept:
    raise errors.UserError(
        f'{label("k")} = {settings.k} is larger than the memory bank, {kept} patches '
        f'({settings.percentage:g} of {num_images} images x {h} x {w}): at most {kept}')
  return kept


def bank_rows(bank):
  """A prepared `knn.Bank`'s rows [M, D] as float32 numpy, without the block padding."""
  rows = np.asarray(bank.blocks).reshape(-1, bank.blocks.shape[-1])
  return rows[:bank.size]


def empty_host_bank(rows, dim):
  """An uninitialised float32 numpy [rows, dim] array whose data is 64-byte aligned.

  On CPU, `jax.device_put` of an aligned numpy array aliases it instead of copying, so blocks of
  the bank reach jitted functions (projection, selection) without a copy.
  """
  size = rows * dim * 4
  raw = np.empty(size + 64, np.uint8)
  offset = (-raw.ctypes.data) % 64
  return raw[offset:offset + size].view(np.float32).reshape(rows, dim)


class DiskBank:
  """A float32 memory bank [rows, dim] in an unlinked temporary file, for banks above the fit's
  memory budget.

  Rows are written batch by batch and read back block by block with plain reads, not a memory
  map: the file's pages sit in the kernel's page cache, which the system reclaims as it needs
  to, and never count as the process's resident memory. `coreset.project` reads it like a host
  array (`bank[a:b]`); `take(indices)` gathers the coreset's rows. The file is unlinked as soon
  as it is created, so nothing is left behind, whatever happens to the process.
  """

  def __init__(self, rows, dim, *, directory=None):
    self.shape = (rows, dim)
    self.dtype = np.dtype(np.float32)
    self.nbytes = rows * dim * 4
    self._row_bytes = dim * 4
    self._file = tempfile.TemporaryFile(dir=directory or None)
    self._file.truncate(self.nbytes)

  def write(self, start, rows):
    """Writes rows [n, dim] at row `start`."""
    rows = np.ascontiguousarray(rows, np.float32)
    os.pwrite(self._file.fileno(), rows.tobytes(), start * self._row_bytes)

  def _read(self, start, count):
    data = os.pread(self._file.fileno(), count * self._row_bytes, start * self._row_bytes)
    if len(data) != count * self._row_bytes:
      raise OSError(f'short read from the memory bank file: {len(data)} bytes')
    return np.frombuffer(data, np.float32).reshape(count, self.shape[1])

  def __getitem__(self, rows):
    if not isinstance(rows, slice):
      return self.take(rows)
    start, stop, step = rows.indices(self.shape[0])
    if step != 1:
      raise IndexError('DiskBank supports contiguous slices and take(indices) only')
    out = empty_host_bank(max(stop - start, 0), self.shape[1])
    out[:] = self._read(start, max(stop - start, 0))
    return out

  def take(self, indices):
    """Rows [len(indices), dim] at `indices` (any order), reading runs of consecutive rows."""
    indices = np.asarray(indices).reshape(-1)
    order = np.argsort(indices, kind='stable')
    out = empty_host_bank(len(indices), self.shape[1])
    sorted_idx = indices[order]
    i = 0
    while i < len(sorted_idx):
      j = i + 1
      while j < len(sorted_idx) and sorted_idx[j] - sorted_idx[j - 1] <= 1:
        j += 1
      first = int(sorted_idx[i])
      run = self._read(first, int(sorted_idx[j - 1]) - first + 1)
      out[order[i:j]] = run[sorted_idx[i:j] - first]
      i = j
    return out

  def close(self):
    self._file.close()


def build_memory_bank(embed_fn, batches, *, num_images, progress=None, timings=None,
                      memory_budget_bytes=None, spill_dir=None):
  """Stacks the patch features of all training images into one [num_images * h * w, D] bank.

  Args:
    embed_fn: images [B, H, W, 3] -> [B, h, w, D].
    batches: iterable of `data.Batch` (images [B, H, W, 3], count: the real images in it).
    num_images: total number of images in `batches` (to allocate the bank once).
    progress: optional callable(images done) after every batch.
    timings: optional dict; 'decode_wait' accumulates the seconds spent waiting for batches.
    memory_budget_bytes: a bank larger than this goes to a `DiskBank` (None: no limit).
    spill_dir: the DiskBank's directory (None: the system's temporary directory).
  Returns:
    float32 numpy array [num_images * h * w, D], or a DiskBank of that shape.
  """
  bank = None
  filled = 0
  per_image = 1
  start = time.perf_counter()
  for batch in timing.timed_iter(batches, timings, 'decode_wait'):
    count = batch.count
    feats = np.asarray(embed_fn(jnp.asarray(batch.images)))[:count]  # [count, h, w, D]
    per_image = feats.shape[1] * feats.shape[2]
    if bank is None:
      rows, dim = num_images * per_image, feats.shape[-1]
      if memory_budget_bytes is not None and rows * dim * 4 > memory_budget_bytes:
        bank = DiskBank(rows, dim, directory=spill_dir)
        logging.info('memory bank: %.2f GiB > budget %.2f GiB: streaming it to a file in %s',
                     rows * dim * 4 / 2**30, memory_budget_bytes / 2**30,
                     spill_dir or tempfile.gettempdir())
      else:
        bank = empty_host_bank(rows, dim)
    if isinstance(bank, DiskBank):
      bank.write(filled, feats.reshape(-1, feats.shape[-1]))
    else:
      bank[filled:filled + count * per_image] = feats.reshape(-1, feats.shape[-1])
    filled += count * per_image
    done = filled // per_image
    if progress is not None:
      progress(done)
    logging.log_every_n_seconds(logging.INFO, 'memory bank: %d/%d images (%.1f images/s)', 10,
                                done, num_images, done / (time.perf_counter() - start))
  if bank is None or filled != bank.shape[0]:
    raise ValueError(f'expected {num_images} images, got {filled // per_image}')
  return bank


def subsample(bank_features, *, percentage, key, projection_dim=128, num_starts=10,
              block_size='auto', precision='highest', screen='auto', progress=False, mesh=None,
              method='auto'):
  """Approximate greedy coreset of `bank_features` [N, D] -> (knn.Bank, indices [M]).

  `screen` (True, or 'auto': on the CPU) adds the bfloat16 screening copy to the bank
  (`knn.screened_nearest_neighbour`);
  `progress` shows a progress bar of the greedy iterations (besides the log lines); `mesh`
  splits the greedy loop over its devices (`sharded.greedy_coreset_loop`: the same picks, and
  one progress report at the end). A `DiskBank` is read block by block for the projection and
  its selected rows gathered from the file. `method`: the one-device greedy loop's
  (`coreset.resolve_method`).
  """
  start = time.perf_counter()
  bar = timing.progress_bar(coreset.coreset_size(bank_features.shape[0], percentage), 'coreset',
                            progress and percentage < 1.0)

  def report(done, total):
    logging.info('coreset: %d/%d points (%.1f ms per iteration)', done, total,
                 1000 * (time.perf_counter() - start) / done)
    if bar is not None:
      bar.update(done - bar.n)

  loop = None
  if mesh is not None:
    loop = lambda projected_t, init, *, num_samples, precision, **_: sharded.greedy_coreset_loop(
        projected_t, init, num_samples=num_samples, mesh=mesh, precision=precision)
  indices = coreset.approximate_greedy_coreset(
      bank_features, percentage=percentage, key=key, projection_dim=projection_dim,
      num_starts=num_starts, precision=precision, chunk_size=2000, progress=report, loop=loop,
      pad_to=coreset.BLOCK_SIZE * (mesh.size if mesh is not None else 1), method=method)
  if mesh is not None:
    report(len(indices), len(indices))
  if bar is not None:
    bar.close()
  if isinstance(bank_features, DiskBank):
    selected = bank_features.take(np.asarray(indices))
  elif percentage == 1.0:
    selected = bank_features
  elif isinstance(bank_features, np.ndarray):
    selected = bank_features[np.asarray(indices)]
  else:
    selected = bank_features[indices]
  return knn.prepare_bank(selected, block_size=block_size, screen=screen), indices
