"""The workdir contract (patchcore_jax/jobs/workdir.py): claims, resume checks, signals, and
failed writes that name their file."""
import errno
import json
import os
import signal
import subprocess
import sys

import pytest

from patchcore_jax import errors
from patchcore_jax import files
from patchcore_jax.jobs import workdir as workdir_lib


def _status(path):
  with open(os.path.join(path, 'status.json')) as f:
    return json.load(f)


def test_complete_failed_and_interrupted_runs_say_so(tmp_path):
  with workdir_lib.running(str(tmp_path / 'a'), job='x', outputs=('out',), overwrite=False) as run:
    run.mark_done('first')
  assert _status(tmp_path / 'a')['status'] == 'complete'
  assert _status(tmp_path / 'a')['done'] == ['first']
  with pytest.raises(RuntimeError):
    with workdir_lib.running(str(tmp_path / 'b'), job='x', outputs=(), overwrite=False):
      raise RuntimeError('boom')
  assert _status(tmp_path / 'b')['status'] == 'failed'
  assert _status(tmp_path / 'b')['error'] == 'RuntimeError: boom'
  with pytest.raises(workdir_lib.Interrupted) as info:
    with workdir_lib.running(str(tmp_path / 'c'), job='x', outputs=(), overwrite=False):
      os.kill(os.getpid(), signal.SIGTERM)  # Raised where it lands.
      for _ in range(10**6):
        pass
  assert info.value.exit_status == 143 and info.value.signal_name == 'SIGTERM'
  status = _status(tmp_path / 'c')
  assert status['status'] == 'interrupted' and status['signal'] == 'SIGTERM'
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Restored.


def test_deferred_signals_wait_for_the_next_check(tmp_path):
  # SIGINT handled as in a terminal, whatever the test runner's process does with it (a
  # background job's shell ignores it, and `running` leaves an ignored signal ignored).
  previous = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _deferred_sigint(tmp_path)
  finally:
    signal.signal(signal.SIGINT, previous)


def _deferred_sigint(tmp_path):
  with pytest.raises(workdir_lib.Interrupted) as info:
    with workdir_lib.running(str(tmp_path), job='x', outputs=(), overwrite=False,
                             defer_signals=True) as run:
      os.kill(os.getpid(), signal.SIGINT)
      for _ in range(10**5):  # The batch goes on ...
        pass
      finished = True
      run.check_interrupt()  # ... and stops here.
  assert finished and info.value.exit_status == 130
  assert _status(tmp_path)['signal'] == 'SIGINT'
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_resume_needs_the_same_job_and_inputs_and_no_live_run(tmp_path):
  inputs = {'model': '/m', 'threshold': -1.0}
  with pytest.raises(errors.UserError, match='holds no earlier run to resume'):
    workdir_lib.claim(str(tmp_path), job='predict', outputs=('a',), overwrite=False, resume=True)
  status = workdir_lib.claim(str(tmp_path), job='predict', outputs=('a',), overwrite=False,
                             inputs=inputs)
  (tmp_path / 'a').write_text('kept')
  with pytest.raises(errors.UserError, match='holds a predict run, not a sweep run'):
    workdir_lib.claim(str(tmp_path), job='sweep', outputs=('a',), overwrite=False, resume=True)
  # Still 'running' under this very process's pid: not another live run (a notebook's run that
  # raised), so it may be resumed; its recorded inputs must match.
  with pytest.raises(errors.UserError, match=r"used other inputs.*threshold: was -1.0, now 0.5"):
    workdir_lib.claim(str(tmp_path), job='predict', outputs=('a',), overwrite=False, resume=True,
                      inputs=dict(inputs, threshold=0.5))
  status = workdir_lib.claim(str(tmp_path), job='predict', outputs=('a',), overwrite=False,
                             resume=True, inputs=inputs)
  assert (tmp_path / 'a').read_text() == 'kept'
  assert status['resumed']['status'] == 'running'
  workdir_lib.finish(str(tmp_path), status, error=workdir_lib.Interrupted(signal.SIGTERM))
  status = workdir_lib.claim(str(tmp_path), job='predict', outputs=('a',), overwrite=False,
                             resume=True, inputs=inputs)
  assert status['resumed']['status'] == 'interrupted' and status['resumed']['signal'] == 'SIGTERM'
  # A run another process still runs is not resumed from under it.
  sleeper = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])
  try:
    files.write_json(str(tmp_path / 'status.json'), dict(status, pid=sleeper.pid))
    with pytest.raises(errors.UserError, match=f'still running \\(pid {sleeper.pid}'):
      workdir_lib.claim(str(tmp_path), job='predict', outputs=('a',), overwrite=False,
                        resume=True, inputs=inputs)
  finally:
    sleeper.kill()
    sleeper.wait()


def test_failed_writes_name_the_file(tmp_path):
  out = str(tmp_path / 'out')
  with pytest.raises(errors.UserError) as info:
    with workdir_lib.running(out, job='x', outputs=(), overwrite=False):
      with files.naming_errors(os.path.join(out, 'results.json')):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))  # A write() finds the disk full.
  assert str(info.value) == (f'cannot write {out}/results.json: No space left on device (the '
                             'disk is full)')
  assert _status(out)['status'] == 'failed'
  # A missing input file is not a vanished workdir: it stays what it was.
  assert workdir_lib.output_error(FileNotFoundError(errno.ENOENT, 'gone', '/elsewhere'),
                                  out) is None
  error = workdir_lib.output_error(OSError(errno.EROFS, 'Read-only file system',
                                           os.path.join(out, 'a.png')), out)
  assert str(error) == f'cannot write {out}/a.png: Read-only file system (the file system is ' \
                       'read-only)'


def test_atomic_writes_leave_nothing_behind_when_they_fail(tmp_path, monkeypatch):
  def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

  monkeypatch.setattr(files.json, 'dumps', lambda *a, **k: 'x' * 10)
  monkeypatch.setattr(files.os, 'replace', full)
  with pytest.raises(OSError) as info:
    files.write_json(str(tmp_path / 'a.json'), {})
  assert info.value.filename == str(tmp_path / 'a.json')
  assert os.listdir(tmp_path) == []


def test_an_ignored_signal_stays_ignored(tmp_path):
  previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # nohup, a background job.
  try:
    with workdir_lib.running(str(tmp_path), job='x', outputs=(), overwrite=False):
      assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
      assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL  # Handled.
  finally:
    signal.signal(signal.SIGINT, previous)
  assert _status(tmp_path)['status'] == 'complete'


def test_nothing_to_resume_creates_nothing(tmp_path):
  with pytest.raises(errors.UserError, match='holds no earlier run to resume'):
    workdir_lib.claim(str(tmp_path / 'new'), job='predict', outputs=(), overwrite=False,
                      resume=True)
  assert not os.path.exists(tmp_path / 'new')
