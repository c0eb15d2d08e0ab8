"""The memory bank sharded by rows over a device mesh: the greedy coreset and the exact kNN.

A bank N times larger than one device's memory fits on N devices: each device holds a contiguous
share of the rows (of the [d, N] projection for the coreset, of the float32 features for the kNN)
and works on its share alone; only a few numbers per pick or per query cross devices. Results are
those of one device:

- Coreset (`greedy_coreset_loop`): every device runs the lazy loop
  (`coreset.refresh_until_top_is_fresh`) on its own blocks until its farthest point is known; the
  farthest of all is the largest of these (ties: the smallest index, a `pmin`), and its projection
  reaches every device through a `psum` to which the other devices add zeros (exact). Distances
  are the same [chunk, d] x [d, block] products as on one device, so the picks are the same.
- kNN (`nearest_neighbours`): every device scans its rows (`knn.scan_partial`), the k best of
  each are gathered, and the k best of all are kept, ties to the smaller index, as the one-device
  scan does.

Data-parallel work (features, prediction) needs nothing from here: put the image batch on
`NamedSharding(mesh, P(AXIS))` (`shard_batch`) and jit splits the computation over the devices.
On a CPU-only machine, `XLA_FLAGS=--xla_force_host_platform_device_count=4` (set before JAX is
imported) makes 4 devices of it.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from patchcore_jax import coreset
from patchcore_jax import knn

AXIS = 'rows'
_NO_INDEX = 2**31 - 1


def row_mesh(num_devices=None, *, axis=AXIS, devices=None):
  """A 1-D mesh over the first `num_devices` of `devices` (default: all of `jax.devices()`, every
  process's), axis name `axis`."""
  devices = jax.devices() if devices is None else list(devices)
  num_devices = num_devices or len(devices)
  if not 1 <= num_devices <= len(devices):
    raise ValueError(f'mesh of {num_devices} devices requested, {len(devices)} available')
  return jax.make_mesh((num_devices,), (axis,), devices=devices[:num_devices],
                       axis_types=(jax.sharding.AxisType.Auto,))


def shard_batch(images, mesh, *, axis=AXIS):
  """images [B, ...] split over the mesh along the batch (B a multiple of the mesh size)."""
  return jax.device_put(images, NamedSharding(mesh, P(axis)))


def _sharded_picks(projected_t, norms, state, *, num_samples, block, chunk, precision, axis):
  """Inside shard_map: every pick of the loop, on this device's columns."""
  per_device = projected_t.shape[1]
  offset = lax.axis_index(axis) * per_device

  def body(t, state):
    state = coreset.refresh_until_top_is_fresh(t, state, projected_t=projected_t, norms=norms,
                                               block=block, chunk=chunk, precision=precision)
    local_max, local_index = coreset.farthest(state, block=block)
    top = lax.pmax(local_max, axis)
    index = lax.pmin(jnp.where(local_max == top, offset + local_index, _NO_INDEX), axis)
    mine = index - offset
    owned = (mine >= 0) & (mine < per_device)
    column = jnp.clip(mine, 0, per_device - 1)
    centre = lax.dynamic_index_in_dim(projected_t, column, axis=1, keepdims=False)
    centre = lax.psum(jnp.where(owned, centre, 0.0), axis)  # x + 0 + ... + 0 == x exactly.
    centre_norm = lax.psum(jnp.where(owned, norms[column], 0.0), axis)
    return coreset.add_centre(state, t, index, centre, centre_norm)

  return lax.fori_loop(0, num_samples, body, state)


def greedy_coreset_loop(projected_t, init_dist, *, num_samples, mesh, axis=AXIS,
                        precision='highest', block_size=coreset.BLOCK_SIZE,
                        centre_chunk=coreset.CENTRE_CHUNK):
  """`coreset.greedy_coreset_loop` with the projection's columns split over `mesh`'s `axis`.

  Args:
    projected_t: [d, N'] projection (N' >= N = len(init_dist); columns past N are padding). It is
      padded to a multiple of block x devices here when needed (a copy; `coreset.project(...,
      pad_to=block_size * devices)` avoids it).
    init_dist: [N] initial squared distances.
    num_samples, precision, block_size, centre_chunk: as `coreset.greedy_coreset_loop`.
    mesh, axis: the devices and the mesh axis the columns are split over.
  Returns:
    [num_samples] int32 indices, equal to the one-device loop's with the same block size.
  """
  devices = mesh.shape[axis]
  n = init_dist.shape[0]
  if num_samples > n:
    raise ValueError(f'cannot pick {num_samples} of {n} points')
  projected_t, block = coreset.pad_to_blocks(projected_t, block_size=block_size, devices=devices)
  state = coreset.initial_state(projected_t, init_dist, num_samples=num_samples, block=block,
                                chunk=centre_chunk)
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  norms = put(coreset.squared_norms_jit(projected_t), P(axis))
  projected_t = put(projected_t, P(None, axis))
  state = jax.tree.map(put, state, _state_spec(axis))
  run = _compiled_picks(mesh, axis, num_samples, block, centre_chunk, precision)
  return run(projected_t, norms, state).selected


def _state_spec(axis):
  """Per-device distances, block maxima and counters; replicated centres and picks."""
  rows, replicated = P(axis), P()
  return coreset.GreedyState(rows, rows, rows, replicated, replicated, replicated)


@functools.lru_cache(maxsize=16)
def _compiled_picks(mesh, axis, num_samples, block, chunk, precision):
  """The jitted, shard_mapped loop, one per mesh and shape (calls reuse its compilation)."""
  state_spec = _state_spec(axis)
  # check_vma=False: the collectives are explicit (pmax/pmin/psum), and the loop carry mixes
  # per-device (distances) and replicated (centres) values.
  return jax.jit(jax.shard_map(
      functools.partial(_sharded_picks, num_samples=num_samples, block=block, chunk=chunk,
                        precision=precision, axis=axis),
      mesh=mesh, in_specs=(P(None, axis), P(axis), state_spec), out_specs=state_spec,
      check_vma=False))


def shard_bank(bank, mesh, *, axis=AXIS):
  """A `knn.Bank` with its blocks split over the mesh (padded with empty blocks to a multiple of
  the mesh size; the screening copy is dropped: sharded searches scan)."""
  devices = mesh.shape[axis]
  pad = -bank.blocks.shape[0] % devices
  blocks = jnp.pad(bank.blocks, ((0, pad), (0, 0), (0, 0)))
  norms = jnp.pad(bank.norms, ((0, pad), (0, 0)), constant_values=jnp.inf)
  return knn.Bank(jax.device_put(blocks, NamedSharding(mesh, P(axis))),
                  jax.device_put(norms, NamedSharding(mesh, P(axis))))


def _sharded_scan(queries, blocks, norms, *, k, precision, axis):
  """Inside shard_map: this device's k best rows, then the k best over every device."""
  best, index = knn.scan_partial(queries, blocks, norms, k=k, precision=precision)
  index = index + lax.axis_index(axis) * (blocks.shape[0] * blocks.shape[1])
  # [P, devices * k], device by device: on equal values top_k keeps the earlier, smaller index.
  best = lax.all_gather(best, axis, axis=1, tiled=True)
  index = lax.all_gather(index, axis, axis=1, tiled=True)
  neg, pick = lax.top_k(-best, k)
  return knn.finish_distances(queries, -neg), jnp.take_along_axis(index, pick, axis=1)


@functools.partial(jax.jit, static_argnames=('mesh', 'axis', 'k', 'precision'))
def nearest_neighbours(queries, bank, *, mesh, axis=AXIS, k=1, precision='highest'):
  """`knn.nearest_neighbours` over a bank from `shard_bank`: queries [P, D] (replicated) ->
  (squared distances [P, k], indices [P, k] into the unsharded bank), equal to one device's."""
  # check_vma=False: the scan's carry starts replicated and becomes per-device; the combination
  # is the explicit all_gather.
  return jax.shard_map(
      functools.partial(_sharded_scan, k=k, precision=lax.Precision(precision), axis=axis),
      mesh=mesh, in_specs=(P(), P(axis), P(axis)), out_specs=(P(), P()), check_vma=False)(
          queries, bank.blocks, bank.norms)
