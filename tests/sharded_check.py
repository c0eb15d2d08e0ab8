"""Run by tests/test_sharded.py in a process with 4 virtual CPU devices (XLA_FLAGS must be set
before JAX starts); prints one JSON object of checks, sharded against one device."""
import json
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=4')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from patchcore_jax import coreset  # pylint: disable=g-import-not-at-top,wrong-import-position
from patchcore_jax import features  # pylint: disable=g-import-not-at-top,wrong-import-position
from patchcore_jax import knn  # pylint: disable=g-import-not-at-top,wrong-import-position
from patchcore_jax import sharded  # pylint: disable=g-import-not-at-top,wrong-import-position


def clustered(n, d, seed):
  rng = np.random.default_rng(seed)
  centres = rng.normal(size=(12, d)) * 5
  return (centres[rng.integers(0, 12, n)] + rng.normal(size=(n, d))).astype(np.float32)


def main():
  checks = {'devices': len(jax.devices())}
  mesh = sharded.row_mesh(4)
  # Coreset: 5,003 points (not a multiple of 4 x 256: padding on the last device), and small
  # integer points with exact ties (the first index must win across devices too).
  x = clustered(5003, 16, seed=0)
  pt = jnp.asarray(x.T)
  init = coreset.initial_distances(pt, jax.random.key(0))
  one = coreset.greedy_coreset_loop(pt, init, num_samples=400, block_size=256)
  four = sharded.greedy_coreset_loop(pt, init, num_samples=400, mesh=mesh, block_size=256)
  checks['coreset_equal'] = bool(np.array_equal(np.asarray(one), np.asarray(four)))
  ties = np.random.default_rng(1).integers(0, 3, (1001, 4)).astype(np.float32)
  tt, tinit = jnp.asarray(ties.T), jnp.full((1001,), 50.0)
  one = coreset.greedy_coreset_loop(tt, tinit, num_samples=200, block_size=64, centre_chunk=8)
  four = sharded.greedy_coreset_loop(tt, tinit, num_samples=200, mesh=mesh, block_size=64,
                                     centre_chunk=8)
  checks['coreset_ties_equal'] = bool(np.array_equal(np.asarray(one), np.asarray(four)))
  # kNN: a bank of 23 blocks (not a multiple of 4), queries near its rows, k = 1 and 3.
  bank = knn.prepare_bank(jnp.asarray(x[:2900]))
  queries = jnp.asarray(x[2900:3400] + 0.05)
  shards = sharded.shard_bank(bank, mesh)
  for k in (1, 3):
    d1, i1 = knn.nearest_neighbours(queries, bank, k=k)
    d4, i4 = sharded.nearest_neighbours(queries, shards, mesh=mesh, k=k)
    checks[f'knn{k}_distances_equal'] = bool(np.array_equal(np.asarray(d1), np.asarray(d4)))
    checks[f'knn{k}_indices_equal'] = bool(np.array_equal(np.asarray(i1), np.asarray(i4)))
  # Data parallel: patch features of a batch split over the devices.
  rng = np.random.default_rng(2)
  maps = [rng.normal(size=(8, 16, 16, 24)).astype(np.float32),
          rng.normal(size=(8, 8, 8, 40)).astype(np.float32)]
  embed = jax.jit(lambda a, b: features.patch_features([a, b], patch_size=3, pretrain_dim=64,
                                                       target_dim=64))
  ref = embed(*maps)
  split = embed(*[sharded.shard_batch(m, mesh) for m in maps])
  checks['embed_sharded_over'] = len(split.sharding.device_set)
  checks['embed_max_difference'] = float(np.max(np.abs(np.asarray(ref) - np.asarray(split))))
  checks.update(run_on_mesh())
  print(json.dumps(checks))


def run_on_mesh():
  """experiment.run on a small generated folder with 1 and with 4 devices (fit, coreset,
  prediction, metrics)."""
  import tempfile  # pylint: disable=g-import-not-at-top
  from configs import folder  # pylint: disable=g-import-not-at-top
  from patchcore_jax.jobs import experiment  # pylint: disable=g-import-not-at-top
  out = {}
  with tempfile.TemporaryDirectory() as tmp:
    from tests.conftest import write_tiny_folder  # pylint: disable=g-import-not-at-top
    root = write_tiny_folder(os.path.join(tmp, 'tiles'), np.random.default_rng(0), size=(64, 64))
    results = {}
    for devices in (1, 4):
      config = folder.get_config()
      config.data.root = root
      config.data.image_size = config.data.resize = 64
      config.devices = devices
      config.output.num_overlays = 0
      results[devices] = experiment.run(config, os.path.join(tmp, f'run{devices}'))['tiles']
      with open(os.path.join(tmp, f'run{devices}', 'scores', 'tiles.csv')) as f:
        results[devices]['scores'] = [float(line.split(',')[-1]) for line in f.readlines()[1:]]
    one, four = results[1], results[4]
    out['run_devices'] = four['devices']
    from patchcore_jax import saving  # pylint: disable=g-import-not-at-top
    banks = [np.asarray(saving.load(r['model_dir']).bank.blocks) for r in (one, four)]
    out['run_bank_max_difference'] = float(np.max(np.abs(banks[0] - banks[1])))
    out['run_metrics'] = [[r[k] for k in ('image_auroc', 'pixel_auroc', 'au_pro')]
                          for r in (one, four)]
    a, b = np.array(one['scores']), np.array(four['scores'])
    out['run_score_max_relative_difference'] = float(np.max(np.abs(a - b) / np.abs(a)))
  return out


if __name__ == '__main__':
  main()
