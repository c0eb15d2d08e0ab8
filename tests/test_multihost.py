"""Two processes on the loopback address as one job (jax.distributed, CPU collectives) against
one process: the same coreset, scores and metrics; only process 0 writes outputs."""
import csv
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from patchcore_jax import multihost
from tests.conftest import write_tiny_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_shares_cover_the_items_in_order():
  for n, count in ((10, 3), (2, 4), (7, 1)):
    shares = [multihost.share(n, process_index=p, process_count=count) for p in range(count)]
    assert shares[0][0] == 0 and shares[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(shares, shares[1:]))
    assert max(b - a for a, b in shares) - min(b - a for a, b in shares) <= 1


def _free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def _scores(workdir):
  with open(os.path.join(workdir, 'scores', 'tiles.csv')) as f:
    return [(row['path'], float(row['score'])) for row in csv.DictReader(f)]


def test_two_processes_fit_and_score_as_one(tmp_path):
  tiles = write_tiny_folder(str(tmp_path / 'tiles'), np.random.default_rng(0), size=(64, 64))
  args = [sys.executable, 'launch.py', '--config=configs/folder.py', f'--config.data.root={tiles}',
          '--config.data.image_size=64', '--config.data.resize=64', '--config.data.batch_size=2',
          '--config.output.num_overlays=2']
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  env.pop('XLA_FLAGS', None)
  one = subprocess.run(args + [f'--workdir={tmp_path / "one"}'], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=600, check=False)
  assert one.returncode == 0, one.stderr[-3000:]
  address = f'127.0.0.1:{_free_port()}'
  procs = [subprocess.Popen(
      args + [f'--workdir={tmp_path / f"p{i}"}', f'--config.distributed.coordinator_address={address}',
              '--config.distributed.num_processes=2', f'--config.distributed.process_id={i}',
              '--config.distributed.timeout_seconds=120'],
      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
          for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert not os.path.exists(tmp_path / 'p1' / 'results.json')  # Process 0 writes the outputs.
  a = json.load(open(tmp_path / 'one' / 'results.json'))['tiles']
  b = json.load(open(tmp_path / 'p0' / 'results.json'))['tiles']
  assert b['processes'] == 2 and a['processes'] == 1
  for key in ('image_auroc', 'pixel_auroc', 'au_pro', 'memory_bank_size', 'num_train_images'):
    assert a[key] == b[key], key
  sa, sb = _scores(tmp_path / 'one'), _scores(tmp_path / 'p0')
  assert [p for p, _ in sa] == [p for p, _ in sb]
  np.testing.assert_allclose([s for _, s in sb], [s for _, s in sa], rtol=1e-6)
  from patchcore_jax import saving  # pylint: disable=g-import-not-at-top
  banks = [np.asarray(saving.load(r['model_dir']).bank.blocks) for r in (a, b)]
  np.testing.assert_array_equal(banks[0], banks[1])  # The same coreset, row for row.
  assert sorted(os.listdir(tmp_path / 'p0' / 'maps' / 'tiles')) == sorted(
      os.listdir(tmp_path / 'one' / 'maps' / 'tiles'))


def test_bad_coordinators_are_user_errors_not_aborts():
  """JAX's runtime aborts the process on an unreachable coordinator: refused before that."""
  from patchcore_jax import errors  # pylint: disable=g-import-not-at-top
  port = _free_port()
  join = lambda address, pid: multihost.initialize(address, num_processes=2, process_id=pid,
                                                   timeout_seconds=1)
  with pytest.raises(errors.UserError, match='must be host:port'):
    join('localhost', 1)
  with pytest.raises(errors.UserError, match=f'no coordinator answered at 127.0.0.1:{port}'):
    join(f'127.0.0.1:{port}', 1)
  with pytest.raises(errors.UserError, match='0 <= process_id < num_processes'):
    join(f'127.0.0.1:{port}', 2)
  with socket.socket() as busy:
    busy.bind(('', port))
    busy.listen()
    with pytest.raises(errors.UserError, match=f'process 0 cannot listen on port {port}'):
      join(f'127.0.0.1:{port}', 0)
