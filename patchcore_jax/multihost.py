"""Many processes as one job: `jax.distributed`, each process reading its share of the images.

With `config.distributed.coordinator_address` set, every process (one per host, or several on
one machine) runs the same command with its own `process_id`; `initialize` joins them through
JAX's own runtime (on CPU its collectives are Gloo's, over TCP). Then, per category:

- Fit: process p reads and embeds only its contiguous share of the training images (`share`),
  so the full-precision bank is split over the hosts' memories in the one-process row order.
  Each projects its rows (the same random map everywhere: one seed), the [d, N] projections are
  gathered (8x smaller than the features with d = 128 and D = 1024), and the greedy coreset runs
  over the mesh of every process's devices (`sharded.greedy_coreset_loop`). Each process then
  contributes the selected rows it holds (`gather_selected`); every process ends with the same
  model as one process would fit.
- Prediction: process p scores its share of the test images; image scores, maps and masks are
  gathered (`allgather_rows`) and process 0 computes the metrics and writes every output; the
  others write nothing.

Two processes on one machine (what tests/test_multihost.py runs):

  python launch.py --config=configs/demo.py --workdir=workdirs/mh \
      --config.distributed.coordinator_address=127.0.0.1:12345 \
      --config.distributed.num_processes=2 --config.distributed.process_id=0 &
  python launch.py --config=configs/demo.py --workdir=workdirs/mh_1 \
      --config.distributed.coordinator_address=127.0.0.1:12345 \
      --config.distributed.num_processes=2 --config.distributed.process_id=1

(on several hosts: the coordinator's address, reachable from all, and the same data path on
each; only process 0's workdir receives outputs).
"""
import socket
import time

import jax
from jax.experimental import multihost_utils
import numpy as np

from patchcore_jax import coreset
from patchcore_jax import errors
from patchcore_jax import sharded


def initialize(coordinator_address, *, num_processes=1, process_id=0, timeout_seconds=300):
  """Joins process `process_id` of `num_processes` to the job coordinated at
  `coordinator_address` (host:port of process 0; no-op when it is empty or this process already
  joined). Must run before anything uses a JAX device.
  Returns:
    Whether the process is part of a multi-process job.
  """
  address = coordinator_address
  if not address:
    return False
  if jax.distributed.is_initialized():
    return True
  count, index = num_processes, process_id
  if count < 1 or not 0 <= index < count:
    raise errors.UserError(
        f'config.distributed.process_id={index} with num_processes={count} is not allowed: '
        'need num_processes >= 1 and 0 <= process_id < num_processes')
  _check_coordinator(address, index, timeout_seconds)
  try:
    jax.distributed.initialize(coordinator_address=address, num_processes=count,
                               process_id=index,
                               initialization_timeout=timeout_seconds)
  except RuntimeError as error:  # Unreachable coordinator, port in use, JAX already started.
    raise errors.UserError(f'config.distributed: cannot join {address} as process {index} of '
                           f'{count}: {error}') from error
  return True


def _check_coordinator(address, process_id, timeout_seconds):
  """Raises errors.UserError when process 0 cannot listen on `address` (a port in use) or, for
  the others, when nothing listens there within `timeout_seconds`: JAX's runtime would abort the
  process instead of raising."""
  host, sep, port = address.rpartition(':')
  if not sep or not host or not port.isdigit():
    raise errors.UserError(f'config.distributed.coordinator_address={address!r} is not allowed: '
                           'must be host:port, e.g. 10.0.0.1:12345')
  if process_id == 0:
    with socket.socket() as s:
      try:
        s.bind(('', int(port)))
      except OSError as error:
        raise errors.UserError(f'config.distributed: process 0 cannot listen on port {port} '
                               f'({error.strerror}); choose another coordinator_address port'
                              ) from error
    return
  deadline = time.monotonic() + timeout_seconds
  while True:
    try:
      socket.create_connection((host, int(port)), timeout=2).close()
      return
    except OSError as error:
      if time.monotonic() > deadline:
        raise errors.UserError(
            f'config.distributed: no coordinator answered at {address} within '
            f'{timeout_seconds} s (is process 0 running, and reachable from here?): '
            f'{error.strerror or error}') from error
      time.sleep(0.5)


def share(num_items, *, process_index=None, process_count=None):
  """(start, stop): process `process_index`'s contiguous share of `num_items` items (the first
  num_items % process_count processes get one more)."""
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  base, extra = divmod(num_items, count)
  start = index * base + min(index, extra)
  return start, start + base + (index < extra)


def row_counts(local_rows):
  """[process_count] int: every process's `local_rows`, on every process."""
  if jax.process_count() == 1:
    return np.array([local_rows])
  return np.asarray(multihost_utils.process_allgather(np.array([local_rows]))).reshape(-1)


def allgather_rows(local):
  """Every process's `local` [n_p, ...] rows (any n_p), concatenated in process order, on every
  process."""
  local = np.asarray(local)
  if jax.process_count() == 1:
    return local
  counts = row_counts(len(local))
  padded = np.zeros((int(counts.max()),) + local.shape[1:], local.dtype)
  padded[:len(local)] = local
  gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, largest, ...]
  return np.concatenate([part[:n] for part, n in zip(gathered, counts)])


def global_mesh():
  """The 1-D mesh over every device of every process."""
  return sharded.row_mesh(len(jax.devices()))


def coreset_indices(local_features, *, total_rows, percentage, key, projection_dim=128,
                    num_starts=10, precision='highest'):
  """`coreset.approximate_greedy_coreset` of the bank whose rows are split over the processes,
  in process order (this process holds `local_features`): the same steps and keys, the
  projections gathered, the loop over `global_mesh()`.
  Returns:
    numpy [int(total_rows * percentage)] int32 indices into the whole bank, on every process.
  """
  if percentage == 1.0:
    return np.arange(total_rows, dtype=np.int32)
  num_samples = coreset.coreset_size(total_rows, percentage)
  proj_key, start_key = jax.random.split(key)
  matrix = coreset.random_projection(proj_key, local_features.shape[1], projection_dim)
  local = np.asarray(coreset.project(local_features, matrix))[:, :local_features.shape[0]]
  projected_t = allgather_rows(local.T).T  # [d, N]
  mesh = global_mesh()
  projected_t, _ = coreset.pad_to_blocks(np.ascontiguousarray(projected_t), devices=mesh.size)
  init = coreset.initial_distances(projected_t, start_key, num_starts=num_starts,
                                   precision=precision, num_points=total_rows)
  selected = sharded.greedy_coreset_loop(projected_t, init, num_samples=num_samples, mesh=mesh,
                                         precision=precision)
  return np.asarray(selected.addressable_data(0))  # Replicated: every process holds it all.


def gather_selected(local_features, indices):
  """The bank rows at `indices` (in that order) [M, D], on every process: each process
  contributes the rows it holds (the bank's rows are the processes' rows in process order)."""
  counts = row_counts(local_features.shape[0])
  start = int(counts[:jax.process_index()].sum())
  stop = start + local_features.shape[0]
  indices = np.asarray(indices)
  mine = np.flatnonzero((indices >= start) & (indices < stop))
  rows = np.asarray(local_features[indices[mine] - start] if len(mine) else
                    np.zeros((0, local_features.shape[1]), np.float32), np.float32)
  if jax.process_count() == 1:
    return rows
  largest = int(row_counts(len(mine)).max())
  padded_rows = np.zeros((largest, rows.shape[1]), np.float32)
  padded_rows[:len(mine)] = rows
  padded_pos = np.full((largest,), -1, np.int64)
  padded_pos[:len(mine)] = mine
  all_rows = np.asarray(multihost_utils.process_allgather(padded_rows))
  all_pos = np.asarray(multihost_utils.process_allgather(padded_pos))
  out = np.zeros((len(indices), rows.shape[1]), np.float32)
  for p_rows, p_pos in zip(all_rows, all_pos):
    keep = p_pos >= 0
    out[p_pos[keep]] = p_rows[keep]
  return out
