"""The workdir contract: atomic files, one run per workdir, and a status that is written last.

Every job that writes outputs (experiment, predict, sweep) claims its workdir first:
  * a workdir holding another run's outputs is refused (a user error naming them), unless the
    config says `output.overwrite=True`, which removes those outputs (and nothing else: the
    generated demo data under `data/` stays);
  * `status.json` is written before any work: {"status": "running", "job", "started", "pid",
    "host", "done": [...]}; each finished unit of work (a category) is appended to "done"; at the
    end "status" becomes "complete" (with "finished"), or "failed" (with "error") when the job
    raised. A run that was killed keeps "running": by the files alone it is not finished.
  * every file is written under a temporary name and renamed into place (`files.write_json`,
    `files.write_text`, `files.save_png`), so no file is ever half-written.
The benchmark job claims nothing: its outputs are measurements, rewritten by every run.
"""
import datetime
import json
import os
import shutil
import socket

from patchcore_jax import errors
from patchcore_jax.files import write_json

STATUS = 'status.json'


def _now():
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')


def read_status(workdir):
  """The workdir's status.json, or None."""
  try:
    with open(os.path.join(workdir, STATUS)) as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def claim(workdir, *, job, outputs, overwrite):
  """Checks that `workdir` holds no other run's `outputs` (names relative to it), removes them
  with `overwrite`, and writes status.json as 'running'. Returns the status dict."""
  os.makedirs(workdir, exist_ok=True)
  present = sorted(name for name in (*outputs, STATUS)
                   if os.path.lexists(os.path.join(workdir, name)))
  if present and not overwrite:
    status = read_status(workdir) or {}
    described = f"a {status.get('job', '')} run, status {status.get('status', 'unknown')!r}"
    if status.get('started'):
      described += f", started {status['started']}"
    raise errors.UserError(
        f'workdir {workdir} already holds another run\'s outputs ({described}: '
        f'{", ".join(present)}); use a new --workdir, or pass --config.output.overwrite=True '
        'to replace them')
  for name in present:
    path = os.path.join(workdir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    else:
      os.remove(path)
  status = {'status': 'running', 'job': job, 'started': _now(), 'pid': os.getpid(),
            'host': socket.gethostname(), 'done': []}
  write_json(os.path.join(workdir, STATUS), status)
  return status


def mark_done(workdir, status, unit):
  """Records one finished unit of work (e.g. a category) in status.json."""
  status['done'].append(unit)
  write_json(os.path.join(workdir, STATUS), status)


def finish(workdir, status, *, error=None):
  """Writes the final status: 'complete', or 'failed' with the error's message."""
  status['status'] = 'failed' if error is not None else 'complete'
  status['finished'] = _now()
  if error is not None:
    status['error'] = f'{type(error).__name__}: {error}'
  write_json(os.path.join(workdir, STATUS), status)
