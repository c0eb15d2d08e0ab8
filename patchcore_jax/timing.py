"""Timing and memory: compile time apart from steady state, every call waited for.

  compiled, seconds = compile_fn(fn, args)       # jax.jit(fn).lower(*args).compile(), timed
  times = call_times(compiled, args, repeats=7)  # warm-up, then blocked wall times
  record('knn', 'jit', 'size', times, compile_seconds=seconds)

`time_jit` and `time_eager` combine them; `markdown` renders a list of `Record`s. Used by the
benchmark job; usable on any function in a notebook. Long loops report through `timed_iter`
(seconds spent waiting for the next item), `progress_bar` and `peak_rss_bytes`.
"""
import dataclasses
import os
import platform
import resource
import time
from typing import Optional

import jax
import numpy as np


@dataclasses.dataclass
class Record:
  """One timed (stage, mode, size). Seconds are per call unless `size` says per image/iteration.

  mode: 'jit', 'eager', or what the row compares with ('faiss', 'numpy', 'torch', 'official',
    'unfold', 'limit', 'wall').
  limit_seconds: the machine-limit time for the same work, measured in the same process.
  efficiency: limit_seconds / median_seconds.
  note: how the row was measured, when that is not obvious (e.g. iterations timed).
  """
  stage: str
  mode: str
  size: str
  compile_seconds: Optional[float]
  median_seconds: float
  min_seconds: float
  max_seconds: float
  limit_seconds: Optional[float] = None
  efficiency: Optional[float] = None
  note: str = ''


def call_times(fn, args, *, repeats, warmup=1, per=1.0):
  """Wall times of `repeats` calls of fn(*args), each blocked until ready, divided by `per`."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - start) / per)
  return times


def compile_fn(fn, args):
  """(compiled, seconds) for `jax.jit(fn)` lowered and compiled at `args`."""
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*args).compile()
  return compiled, time.perf_counter() - start


def record(stage, mode, size, times, *, compile_seconds=None, limit=None, note=''):
  """A `Record` of per-call `times` (median, min, max)."""
  median = float(np.median(times))
  return Record(stage, mode, size, compile_seconds, median, float(min(times)), float(max(times)),
                limit, None if limit is None else limit / median, note)


def time_jit(stage, size, fn, args, *, repeats, per=1.0, limit=None, note=''):
  """Compile once (timed), then time the compiled function."""
  compiled, seconds = compile_fn(fn, args)
  times = call_times(compiled, args, repeats=repeats, per=per)
  return record(stage, 'jit', size, times, compile_seconds=seconds, limit=limit, note=note)


def time_eager(stage, size, fn, args, *, repeats, per=1.0, limit=None, note=''):
  """fn(*args) op by op under `jax.disable_jit()` (one warm-up call first)."""
  with jax.disable_jit():
    times = call_times(fn, args, repeats=repeats, per=per)
  return record(stage, 'eager', size, times, limit=limit, note=note)


def time_host(stage, mode, size, fn, *, repeats, per=1.0, warmup=1, note=''):
  """fn() timed as it is (host code, or functions that compile on their first call, which the
  warm-up absorbs)."""
  return record(stage, mode, size, call_times(fn, (), repeats=repeats, warmup=warmup, per=per),
                note=note)


def peak_rss_bytes():
  """Peak resident memory of this process so far (Linux reports KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes():
  """Resident memory of this process now."""
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def machine_description():
  model = platform.processor() or platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  return (f'{model}, {os.cpu_count()} CPU cores, JAX {jax.__version__} on '
          f'{jax.devices()[0].platform}, Python {platform.python_version()}')


def format_seconds(seconds):
  if seconds is None:
    return ''
  return f'{seconds * 1e3:.3g} ms' if seconds < 1 else f'{seconds:.3g} s'


def markdown(records, *, header=()):
  """The records as a markdown table; every other row of a (stage, size) compares with its jit
  row ('jit speed-up': the other row's time over the jit row's)."""
  jit = {(r.stage, r.size): r.median_seconds for r in records if r.mode == 'jit'}
  lines = list(header) + [
      '| stage | size | mode | compile | median | min | max | limit | efficiency | jit speed-up |',
      '|---|---|---|---|---|---|---|---|---|---|',
  ]
  for r in records:
    ratio = ''
    if r.mode != 'jit' and (r.stage, r.size) in jit:
      ratio = f'{r.median_seconds / jit[(r.stage, r.size)]:.2f}x'
    eff = '' if r.efficiency is None else f'{r.efficiency:.0%}'
    fmt = format_seconds
    lines.append(f'| {r.stage} | {r.size} | {r.mode} | {fmt(r.compile_seconds)} | '
                 f'{fmt(r.median_seconds)} | {fmt(r.min_seconds)} | {fmt(r.max_seconds)} | '
                 f'{fmt(r.limit_seconds)} | {eff} | {ratio} |')
  notes = [f'- {r.stage} / {r.mode} / {r.size}: {r.note}' for r in records if r.note]
  if notes:
    lines += ['', 'Notes:'] + notes
  return '\n'.join(lines) + '\n'


def timed_iter(iterable, timings, name):
  """Yields from `iterable`, adding the seconds spent waiting for each item to timings[name]
  (when `timings` is a dict; e.g. the wait for images decoded in worker threads)."""
  iterator = iter(iterable)
  while True:
    start = time.perf_counter()
    try:
      item = next(iterator)
    except StopIteration:
      return
    if timings is not None:
      timings[name] = timings.get(name, 0.0) + time.perf_counter() - start
    yield item


def progress_bar(total, desc, enabled):
  """A tqdm.auto bar (a widget in notebooks, text in terminals), or None when not `enabled`."""
  if not enabled:
    return None
  from tqdm import auto as tqdm_auto  # pylint: disable=g-import-not-at-top
  return tqdm_auto.tqdm(total=total, desc=desc, unit='img', leave=False)
