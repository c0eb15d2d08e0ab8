"""The workdir contract: atomic files, one run per workdir, a status written last, and signals.

Every job that writes outputs (experiment, predict, sweep) runs inside `running(workdir, ...)`:
  * a workdir holding another run's outputs is refused (a user error naming them), unless the
    config says `output.overwrite=True`, which removes those outputs (and nothing else: the
    generated demo data under `data/` stays), or the job resumes an earlier run of its own
    (`resume=True`: the outputs stay, and the recorded `inputs` must be the same);
  * `status.json` is written before any work: {"status": "running", "job", "started", "pid",
    "host", "inputs", "done": [...]}; each finished unit of work (a category) is appended to
    "done"; at the end "status" becomes "complete" (with "finished"), "interrupted" (with
    "signal": SIGTERM or SIGINT stopped it) or "failed" (with "error"). A run that was killed
    (SIGKILL, power loss) keeps "running": by the files alone it is not finished.
  * SIGTERM and SIGINT raise `Interrupted` (exit status 128 + the signal: 143, 130 from
    launch.py) where the job can stop cleanly: at once, or with `defer_signals` at the job's next
    `Run.check_interrupt()` (the predict job finishes its batch first; a second signal stops at
    once);
  * a write that fails for want of space, permission, or because the workdir vanished becomes one
    `errors.UserError` naming the file ("cannot write PATH: No space left on device ..."), and the
    status `failed`;
  * every file is written under a temporary name and renamed into place (`files.write_json`,
    `files.write_text`, `files.save_png`), so no file is ever half-written.
The benchmark job claims nothing: its outputs are measurements, rewritten by every run.
"""
import contextlib
import datetime
import errno
import json
import os
import shutil
import signal
import socket
import threading

from absl import logging

from patchcore_jax import errors
from patchcore_jax.files import write_json

STATUS = 'status.json'
SIGNALS = (signal.SIGTERM, signal.SIGINT)

# errno of a failed write -> what it means for the user.
WRITE_ERRORS = {
    errno.ENOSPC: 'the disk is full',
    errno.EDQUOT: 'the disk quota is used up',
    errno.EROFS: 'the file system is read-only',
    errno.EACCES: 'no permission to write there',
    errno.EPERM: 'no permission to write there',
    errno.ENOENT: 'the workdir was removed while the job ran',
    errno.ESTALE: 'the workdir was removed while the job ran',
    errno.EIO: 'the storage reported an I/O error',
}


class Interrupted(KeyboardInterrupt):
  """SIGTERM or SIGINT stopped a job. `exit_status`: 128 + the signal number (143, 130)."""

  def __init__(self, signum):
    self.signum = signum
    self.signal_name = signal.Signals(signum).name
    self.exit_status = 128 + signum
    self.detail = ''  # What was finished, set by the job that stopped.
    super().__init__(f'interrupted by {self.signal_name}')

  def __str__(self):
    return f'interrupted by {self.signal_name}' + (f': {self.detail}' if self.detail else '')


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def read_status(workdir):
  """The workdir's status.json, or None."""
  try:
    with open(os.path.join(workdir, STATUS), encoding='utf-8', errors='surrogateescape') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _alive(status):
  """Whether the process a 'running' status names still runs (on this host)."""
  if status.get('host') != socket.gethostname() or not isinstance(status.get('pid'), int):
    return False
  if status['pid'] == os.getpid():
    return False
  try:
    os.kill(status['pid'], 0)
  except ProcessLookupError:
    return False
  except OSError:
    return True
  return True


def _check_resume(workdir, job, inputs):
  """The status of the run to resume in `workdir`; a UserError unless it is one of `job` with the
  same `inputs` that no process is still running."""
  status = read_status(workdir)
  if status is None:
    raise errors.UserError(f'--config.resume=True: {workdir} holds no earlier run to resume (no '
                           f'readable {STATUS}); drop resume to start one')
  if status.get('job') != job:
    raise errors.UserError(f'--config.resume=True: {workdir} holds a {status.get("job")} run, '
                           f'not a {job} run')
  if status.get('status') == 'running' and _alive(status):
    raise errors.UserError(f'--config.resume=True: the run in {workdir} is still running (pid '
                           f'{status["pid"]} on {status["host"]}); stop it first')
  old = status.get('inputs') or {}
  changed = sorted(k for k in set(old) | set(inputs or {}) if old.get(k) != (inputs or {}).get(k))
  if changed:
    details = '; '.join(f'{k}: was {old.get(k)!r}, now {(inputs or {}).get(k)!r}' for k in changed)
    raise errors.UserError(f'--config.resume=True: the run in {workdir} used other inputs, so its '
                           f'results would not match ({details}); use a new --workdir')
  return status


def claim(workdir, *, job, outputs, overwrite, resume=False, inputs=None):
  """Checks that `workdir` holds no other run's `outputs` (names relative to it), removes them
  with `overwrite`, keeps them with `resume` (an earlier run of `job` with the same `inputs`), and
  writes status.json as 'running'. Returns the status dict (with 'resumed': the earlier status,
  when resuming)."""
  previous = _check_resume(workdir, job, inputs) if resume else None  # Before creating it.
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as error:
    raise errors.UserError(f'cannot create the workdir {workdir}: {error.strerror}') from error
  present = sorted(name for name in (*outputs, STATUS)
                   if os.path.lexists(os.path.join(workdir, name)))
  if present and not overwrite and not resume:
    status = read_status(workdir) or {}
    described = f"a {status.get('job', '')} run, status {status.get('status', 'unknown')!r}"
    if status.get('started'):
      described += f", started {status['started']}"
    hint = ''
    if status.get('job') == job and status.get('status') in ('running', 'interrupted', 'failed'):
      hint = '; to continue it, pass --config.resume=True'
    raise errors.UserError(
        f'workdir {workdir} already holds another run\'s outputs ({described}: '
        f'{", ".join(present)}); use a new --workdir, or pass --config.output.overwrite=True '
        f'to replace them{hint}')
  if not resume:
    for name in present:
      path = os.path.join(workdir, name)
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
      else:
        os.remove(path)
  status = {'status': 'running', 'job': job, 'started': _now(), 'pid': os.getpid(),
            'host': socket.gethostname(), 'inputs': inputs or {}, 'done': []}
  if previous is not None:
    status['resumed'] = {k: previous.get(k) for k in ('status', 'started', 'finished', 'signal',
                                                       'error') if previous.get(k) is not None}
  try:
    write_json(os.path.join(workdir, STATUS), status)
  except OSError as error:
    raise errors.UserError(f'cannot write {os.path.join(workdir, STATUS)}: {error.strerror} '
                           f'({WRITE_ERRORS.get(error.errno, "the workdir is not writable")})'
                           ) from error
  return status


def mark_done(workdir, status, unit):
  """Records one finished unit of work (e.g. a category) in status.json."""
  status['done'].append(unit)
  write_json(os.path.join(workdir, STATUS), status)


def _write_status(workdir, status):
  """status.json, atomically where possible, in place when the disk is too full for a second
  copy; a status that cannot be written at all (read-only, vanished) is logged instead."""
  path = os.path.join(workdir, STATUS)
  if not os.path.isdir(workdir):
    logging.error('%s vanished: the final status (%s) is not recorded', workdir, status['status'])
    return
  try:
    write_json(path, status)
    return
  except OSError:
    pass
  try:
    with open(path, 'r+', encoding='utf-8', errors='surrogateescape') as f:
      f.truncate(0)
      f.write(json.dumps(status, indent=2) + '\n')
  except OSError as error:
    logging.error('cannot record the final status (%s) in %s: %s', status['status'], path, error)


def finish(workdir, status, *, error=None):
  """Writes the final status: 'complete', 'interrupted' (an `Interrupted` error) or 'failed' with
  the error's message."""
  status['finished'] = _now()
  if isinstance(error, Interrupted):
    status['status'], status['signal'] = 'interrupted', error.signal_name
  elif error is not None:
    status['status'], status['error'] = 'failed', f'{type(error).__name__}: {error}'
  else:
    status['status'] = 'complete'
  _write_status(workdir, status)


def _inside(path, folder):
  path, folder = os.path.abspath(path), os.path.abspath(folder)
  return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def output_error(error, workdir):
  """A UserError naming the file for an OSError that failed to write into `workdir` (disk full,
  read-only, no permission, workdir vanished), else None."""
  if not isinstance(error, OSError) or error.errno not in WRITE_ERRORS:
    return None
  path = error.filename
  if error.errno in (errno.ENOENT, errno.ESTALE):
    if os.path.isdir(workdir):
      return None  # A missing input file, not a vanished workdir.
    path = path or workdir
  elif path is None or not _inside(path, workdir):
    return None
  return errors.UserError(f'cannot write {path}: {error.strerror} ({WRITE_ERRORS[error.errno]})')


class Run:
  """A claimed workdir: its `status` dict, `mark_done`, `check_interrupt`."""

  def __init__(self, workdir, status):
    self.workdir, self.status = workdir, status
    self._signal = None
    self.deferring = False

  def mark_done(self, unit):
    mark_done(self.workdir, self.status, unit)

  def check_interrupt(self):
    """Raises `Interrupted` if SIGTERM or SIGINT arrived since the run began (with
    `defer_signals`; otherwise they raise where they land)."""
    if self._signal is not None:
      raise Interrupted(self._signal)

  def _handle(self, signum, frame):
    del frame
    if self.deferring and self._signal is None:
      self._signal = signum
      logging.warning('%s received: stopping once the current batch is done (send it again to '
                      'stop at once)', signal.Signals(signum).name)
      return
    raise Interrupted(signum)


@contextlib.contextmanager
def _signals_to(run):
  """SIGTERM and SIGINT go to `run._handle` inside the block (main thread only: elsewhere Python
  cannot install handlers; a signal the process ignores stays ignored)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {}
  try:
    for signum in SIGNALS:
      if signal.getsignal(signum) is not signal.SIG_IGN:
        previous[signum] = signal.signal(signum, run._handle)  # pylint: disable=protected-access
    yield
  finally:
    for signum, handler in previous.items():
      signal.signal(signum, handler)


@contextlib.contextmanager
def running(workdir, *, job, outputs, overwrite, resume=False, inputs=None,
            defer_signals=False):
  """Claims `workdir` (`claim`), yields a `Run`, and writes the final status when the block ends:
  complete, interrupted (SIGTERM/SIGINT: `Interrupted` propagates) or failed. A failed write into
  the workdir (`output_error`) is raised as a UserError naming the file. Signals are handled
  from before the claim to after the final status (one landing while either is written is acted
  on after the claim, or ignored after the end)."""
  run = Run(workdir, None)
  run.deferring = True
  with _signals_to(run):
    run.status = claim(workdir, job=job, outputs=outputs, overwrite=overwrite, resume=resume,
                       inputs=inputs)
    run.deferring = defer_signals
    try:
      run.check_interrupt()
      yield run
    except BaseException as error:
      run.deferring = True
      reported = output_error(error, workdir) or error
      finish(workdir, run.status, error=reported)
      if reported is not error:
        raise reported from error
      raise
    run.deferring = True
    finish(workdir, run.status)
