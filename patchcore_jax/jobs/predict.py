"""run(config, workdir): score new images with a saved model (configs/predict.py).

  python launch.py --config=configs/predict.py --config.model=MODEL_DIR --config.images=PATH \
      --workdir=OUT [--config.resume=True]

PATH is a folder (searched recursively for images), a glob pattern, a text file with one image
path per line (relative paths are relative to the text file), or one image file.

Writes into OUT:
  predictions.csv   path,score,normalized_score,anomalous,error per image, in input order; path
                    relative to PATH for a folder (else to the images' common folder). Rows are
                    appended and flushed to disk batch by batch: after a crash the file holds
                    every batch finished before it (status.json says whether the run ended).
                    Paths are written as the file system stores them: a name that is not valid
                    UTF-8 keeps its bytes (Python reads them back exactly with
                    `open(..., encoding='utf-8', errors='surrogateescape')`).
  overlays/<path>.png  labelled overlays (input | map | blend, fixed colour scale [0, 2 x
                    threshold], file name, score, threshold and decision), with output.overlays
  masks/<path>.png  binary defect masks at the image's ORIGINAL resolution, with output.masks: the
                    map taken back through the crop and the resize, defective above the model's
                    pixel threshold; with the 'resize_crop' transform the border outside the centre
                    crop was never inspected and is 0 (not defective)
  maps/<path>.npy   raw float32 maps at the network's input size, with output.save_maps
  summary.json      counts (scored, failed, resumed), timings (images/s), memory every 1,000
                    images, the model and threshold used; written at the end and on interrupt
  status.json       'running' until the end, then 'complete', 'interrupted' or 'failed'; see
                    `workdir`
A workdir holding another run's outputs is refused unless output.overwrite is set, or resume is
set and it holds an earlier predict run with the same model, images, batch size, threshold and
outputs: then the images already in predictions.csv are skipped (a last row cut short by a crash
is dropped first) and the rest appended, so the file ends with every image once, with the
scores an uninterrupted run gives.

Images stream through in batches (memory stays flat however many there are). No single image
stops the job: one that cannot be read or scored (not an image, NaN pixels, an output that
cannot be written for it) gets a row with its error and the rest go on. SIGTERM or SIGINT:
the current batch is finished and flushed, the status becomes 'interrupted', exit 143 / 130; a
full disk, a read-only or removed workdir: one error naming the file, status 'failed'. Exit
status (launch.py): 0 when every image was scored, 1 when some were not, 2 for a user error (no
model, no images, an unwritable workdir).
"""
import collections
import contextlib
import csv
import dataclasses
import glob
import hashlib
import io
import os
import time

from absl import logging
import jax
import numpy as np

from patchcore_jax import errors
from patchcore_jax import files
from patchcore_jax import model as model_lib
from patchcore_jax import patchcore
from patchcore_jax import saving
from patchcore_jax import stages
from patchcore_jax import timing
from patchcore_jax import visualize
from patchcore_jax.data import common as data_common
from patchcore_jax.data import transforms
from patchcore_jax.jobs import workdir as workdir_lib

COLUMNS = ('path', 'score', 'normalized_score', 'anomalous', 'error')
OUTPUTS = ('predictions.csv', 'summary.json', 'overlays', 'masks', 'maps')
MEMORY_EVERY = 1000  # summary.json's memory trace: RSS every this many images.


def resolve_images(spec):
  """(sorted image paths, base folder for relative names) of a folder, glob, list file or image."""
  if not spec:
    raise errors.UserError('config.images is empty: set --config.images=FOLDER|GLOB|LIST.txt|IMAGE')
  is_image = lambda p: p.lower().endswith(data_common.IMAGE_EXTENSIONS)
  if os.path.isdir(spec):
    paths = sorted(os.path.join(root, name) for root, _, names in os.walk(spec)
                   for name in names if is_image(name))
    base = spec
  elif os.path.isfile(spec) and is_image(spec):
    paths, base = [spec], os.path.dirname(spec)
  elif os.path.isfile(spec):
    folder = os.path.dirname(os.path.abspath(spec))
    with open(spec, 'rb') as f:  # Names as the file system spells them, whatever their bytes.
      lines = [os.fsdecode(line.strip()) for line in f]
    paths = [p if os.path.isabs(p) else os.path.join(folder, p)
             for p in lines if p and not p.startswith('#')]
    base = None
  elif any(c in spec for c in '*?['):
    paths = sorted(p for p in glob.glob(spec, recursive=True) if is_image(p))
    base = None
  else:
    raise errors.UserError(f'config.images={_display(spec)!r}: no such folder, image, list file '
                           'or matches')
  if not paths:
    raise errors.UserError(f'config.images={_display(spec)!r}: no images found (extensions: '
                           f'{", ".join(data_common.IMAGE_EXTENSIONS)})')
  if base is None:
    base = os.path.commonpath([os.path.dirname(os.path.abspath(p)) for p in paths])
  return paths, base


def _load(path, image_config):
  """(network input [S, S, 3] float32, original (width, height))."""
  return transforms.load_image(path, **image_config, return_size=True)


def _peak_rss_mb():
  return timing.peak_rss_bytes() / 2**20


def _display(name):
  """A path for logs and captions: bytes that are not UTF-8 shown as \\xNN escapes."""
  return os.fsencode(name).decode('utf-8', 'backslashreplace')


def _inputs(config, batch_size):
  """What must match for a run to be resumed: the model (model.json names every setting, the
  calibration and the bank's sha256), the images, and everything that changes a row."""
  with open(os.path.join(config.model, saving.MODEL_FILE), 'rb') as f:
    model_sha256 = hashlib.sha256(f.read()).hexdigest()
  return {'model': os.path.abspath(config.model), 'model_json_sha256': model_sha256,
          'images': os.path.abspath(config.images) if os.path.exists(config.images)
                    else config.images,
          'batch_size': batch_size, 'threshold': float(config.threshold),
          'overlays': bool(config.output.overlays), 'masks': bool(config.output.masks),
          'save_maps': bool(config.output.save_maps)}


def run(config, workdir):
  """Scores config.images with the model in config.model; see the module docstring.

  Returns:
    The summary dict (also in workdir/summary.json); its 'exit_status' is 0 when every image was
    scored, else 1.
  Raises:
    workdir.Interrupted on SIGTERM/SIGINT (after flushing the finished batches);
    errors.UserError for a bad model, images or workdir, or a write that failed.
  """
  if not config.model:
    raise errors.UserError('config.model is empty: set --config.model=MODEL_DIR (a folder written '
                           'by an experiment run under WORKDIR/models/<category>, or by save())')
  model = saving.load(config.model, checkpoint=config.checkpoint, cache_dir=config.cache_dir)
  if config.batch_size > 0:
    model = model.replace(settings=dataclasses.replace(model.settings,
                                                       batch_size=config.batch_size))
  if config.threshold >= 0:
    model = model_lib.with_threshold(model, config.threshold)
  paths, base = resolve_images(config.images)
  if model.calibration.image_threshold is None:
    logging.warning('the model has no threshold (fitted without holdout or labelled test data): '
                    'no decisions, masks or overlays; set --config.threshold to add one')
  with workdir_lib.running(workdir, job='predict', outputs=OUTPUTS,
                           overwrite=config.output.overwrite, resume=config.resume,
                           inputs=_inputs(config, model.settings.batch_size),
                           defer_signals=True) as run_status:
    return _score_all(config, workdir, model, paths, base, run_status)


def _names(paths, base):
  return [os.path.relpath(os.path.abspath(p), os.path.abspath(base)) for p in paths]


def read_rows(csv_path, *, repair=False):
  """The complete rows of a predictions.csv (dicts by COLUMNS), in order. A last record cut short
  by a crash (no line end, or a quoted field never closed) is not a row; with `repair` it is cut
  from the file. A file that is not a predictions.csv is a UserError."""
  with open(csv_path, 'rb') as f:
    data = f.read()
  text = data.decode('utf-8', 'surrogateescape')
  end = position = 0  # The end of the last record: a line end outside quotes.
  quoted = False
  for piece in text.split('\r\n')[:-1]:  # Each piece is followed by a line end.
    position += len(piece) + 2
    quoted ^= piece.count('"') % 2 == 1
    if not quoted:
      end = position
  records = list(csv.reader(io.StringIO(text[:end], newline='')))
  if records and tuple(records[0]) != COLUMNS:
    raise errors.UserError(f'{csv_path} is not a predictions.csv (its first line should be '
                           f'{",".join(COLUMNS)})')
  for number, record in enumerate(records[1:], 2):
    if len(record) != len(COLUMNS):
      raise errors.UserError(f'{csv_path}: record {number} has {len(record)} fields, expected '
                             f'{len(COLUMNS)}: the file was edited; use a new --workdir')
  kept = len(text[:end].encode('utf-8', 'surrogateescape'))
  if repair and kept < len(data):
    logging.warning('%s: dropping the last %d bytes, a row cut short when the run stopped',
                    csv_path, len(data) - kept)
    with open(csv_path, 'r+b') as f:
      f.truncate(kept)
  return [dict(zip(COLUMNS, record)) for record in records[1:]]  # [] if the header was cut.


def _pending(paths, names, done_rows):
  """(paths, names) not yet in `done_rows`, in order; each earlier row accounts for one entry
  (a list may name an image several times)."""
  left = collections.Counter(row['path'] for row in done_rows)
  todo = []
  for path, name in zip(paths, names):
    if left[name] > 0:
      left[name] -= 1
    else:
      todo.append((path, name))
  if sum(left.values()):
    logging.warning('%d rows of predictions.csv are for images no longer in config.images: kept',
                    sum(left.values()))
  return [p for p, _ in todo], [n for _, n in todo]


class _Rows:
  """predictions.csv, appended and flushed to disk batch by batch (whole rows only)."""

  def __init__(self, path, *, append):
    self.path = path
    with files.naming_errors(path):
      self.file = open(path, 'a' if append else 'w', encoding='utf-8', errors='surrogateescape',
                       newline='')
    self.inode = os.fstat(self.file.fileno()).st_ino
    if not append or self.file.tell() == 0:
      self.write([COLUMNS])

  def check(self):
    """A UserError if predictions.csv was removed or replaced (a vanished workdir)."""
    try:
      same = os.stat(self.path).st_ino == self.inode
    except OSError:
      same = False
    if not same:
      raise errors.UserError(f'cannot write {self.path}: it was removed or replaced while the job '
                             f'ran (the workdir vanished?)')

  def write(self, rows):
    buffer = io.StringIO()
    csv.writer(buffer).writerows(rows)
    with files.naming_errors(self.path):
      self.file.write(buffer.getvalue())  # One write per batch: rows complete or absent.
      self.file.flush()
      os.fsync(self.file.fileno())

  def close(self):
    with contextlib.suppress(OSError):
      self.file.close()


def _score_all(config, workdir, model, paths, base, run_status):
  """Scores `paths` into workdir; returns the summary."""
  cal, settings = model.calibration, model.settings
  csv_path = os.path.join(workdir, 'predictions.csv')
  names = _names(paths, base)
  done_rows = []
  if config.resume and os.path.exists(csv_path):
    done_rows = read_rows(csv_path, repair=True)
  todo_paths, todo_names = _pending(paths, names, done_rows)
  logging.info('scoring %d images from %s with %s (memory bank %d, threshold %s from %s)%s',
               len(todo_paths), _display(config.images), config.model, model.memory_bank_size,
               cal.image_threshold, cal.image_threshold_source,
               f'; {len(done_rows)} already in {csv_path}' if done_rows else '')
  counts = collections.Counter(scored=sum(r['score'] != '' for r in done_rows),
                               failed=sum(r['error'] != '' for r in done_rows))
  memory = []
  compute_seconds = 0.0
  rows = _Rows(csv_path, append=config.resume and os.path.exists(csv_path))
  bar = timing.progress_bar(len(todo_paths), 'predict', config.output.progress)
  processed = 0
  interrupted = None
  start = time.perf_counter()
  try:
    if todo_paths:
      stages.precompile(model.backbone, settings, model.bank)
    start = last_log = time.perf_counter()
    for offset, (loaded, batch) in zip(
        range(0, len(todo_paths), settings.batch_size),
        _batches(todo_paths, settings, num_workers=config.num_workers)):
      batch_names = todo_names[offset:offset + len(loaded)]
      results, seconds = _score_batch(model, loaded, batch)
      compute_seconds += seconds
      rows.check()
      batch_rows = [_row(workdir, model, config.output, name, item, result, counts)
                    for name, item, result in zip(batch_names, loaded, results)]
      rows.write(batch_rows)
      processed += len(loaded)
      if bar is not None:
        bar.update(len(loaded))
      if processed // MEMORY_EVERY > (processed - len(loaded)) // MEMORY_EVERY or \
          processed == len(todo_paths):
        memory.append({'images': processed, 'rss_mb': timing.rss_bytes() / 2**20,
                       'peak_rss_mb': _peak_rss_mb()})
      now = time.perf_counter()
      if now - last_log > 10:
        last_log = now
        logging.info('%d/%d images (%.1f images/s), RSS %.0f MB (peak %.0f MB)',
                     processed, len(todo_paths), processed / (now - start),
                     timing.rss_bytes() / 2**20, _peak_rss_mb())
      run_status.check_interrupt()
  except workdir_lib.Interrupted as error:
    interrupted = error
  finally:
    rows.close()
    if bar is not None:
      bar.close()
  seconds = time.perf_counter() - start
  total_rows = len(done_rows) + processed
  summary = {
      'model': os.path.abspath(config.model), 'images': config.images,
      'status': 'complete' if interrupted is None else 'interrupted',
      'num_images': len(paths), 'num_rows': total_rows, 'num_scored': counts['scored'],
      'num_failed': counts['failed'], 'num_resumed': len(done_rows),
      'num_this_run': processed, 'seconds': seconds,
      'images_per_second': processed / seconds if processed else None,
      'compute_seconds_per_image': compute_seconds / processed if processed else None,
      'peak_rss_mb': _peak_rss_mb(), 'memory': memory, 'batch_size': settings.batch_size,
      'image_threshold': cal.image_threshold, 'image_threshold_source': cal.image_threshold_source,
      'pixel_threshold': cal.pixel_threshold,
      'exit_status': 0 if counts['failed'] == 0 else 1,
  }
  run_status.status.update(images_done=total_rows, images_total=len(paths))
  if interrupted is not None:
    summary['signal'] = interrupted.signal_name
    summary['exit_status'] = interrupted.exit_status
    interrupted.detail = (f'{total_rows} of {len(paths)} images are in {csv_path}; continue with '
                          '--config.resume=True')
  files.write_json(os.path.join(workdir, 'summary.json'), summary)
  if interrupted is not None:
    raise interrupted
  logging.info('scored %d of %d images (%d resumed from an earlier run) in %.1f s (%s images/s, '
               '%s ms compute per image), %d failed; peak RSS %.0f MB; %s', counts['scored'],
               len(paths), len(done_rows), seconds,
               'n/a' if not processed else f'{summary["images_per_second"]:.1f}',
               'n/a' if not processed else f'{1000 * summary["compute_seconds_per_image"]:.1f}',
               counts['failed'], summary['peak_rss_mb'], csv_path)
  return summary


def _batches(paths, settings, *, num_workers):
  """Yields (loaded: [(path, (image, size) or None, error or None)], the `data.Batch` of its
  readable images or None) per batch of `paths`, decoded in `num_workers` threads; on an
  accelerator the next batches' images are copied to the device before a batch is handed out
  (`data.common.to_device`)."""

  def batched(loaded):
    ok = [item[1][0] for item in loaded if item[2] is None]
    return loaded, (data_common.Batch(data_common.pad_batch(ok, settings.batch_size), len(ok))
                    if ok else None)

  items = map(batched, data_common.map_in_batches(
      lambda p: _load(p, settings.image_config), paths, batch_size=settings.batch_size,
      num_workers=num_workers))
  ahead = data_common.default_device_prefetch()
  if ahead <= 0:
    yield from items
    return
  yield from data_common.lookahead(items, ahead=ahead, put=lambda item: (
      item[0], item[1] and item[1]._replace(images=jax.device_put(item[1].images))))


def _score_batch(model, loaded, batch):
  """([(score, normalized, anomalous, map, image, size) or None per item of `loaded`], compute
  seconds): None where the image could not be read (`batch` holds the others, in order)."""
  ok = [j for j, (_, _, error) in enumerate(loaded) if error is None]
  if not ok:
    return [None] * len(loaded), 0.0
  scores, maps, _, seconds = patchcore.predict_batch(model, batch)
  normalized, anomalous = model_lib.decide(model.calibration, scores)
  results = [None] * len(loaded)
  for i, j in enumerate(ok):
    image, size = loaded[j][1]
    results[j] = (scores[i], None if normalized is None else normalized[i],
                  None if anomalous is None else anomalous[i], maps[i], image, size)
  return results, seconds


def _row(workdir, model, output, name, item, result, counts):
  """The CSV row of one image (writing its overlay, mask and map); a failure is its error."""
  path, _, error = item
  if error is None and not np.isfinite(result[0]):
    error = ValueError(f'the score is not finite ({result[0]})')
  if error is not None:
    counts['failed'] += 1
    logging.warning('cannot score %s: %s', _display(path), error)
    return [name, '', '', '', f'{type(error).__name__}: {error}']
  score, norm, decision, anomaly_map, image, size = result
  counts['scored'] += 1
  row = [name, repr(float(score)), '' if norm is None else repr(float(norm)),
         '' if decision is None else int(decision), '']
  try:
    _write_outputs(workdir, name, model, output, score, anomaly_map, image, size)
  except Exception as failure:  # pylint: disable=broad-except
    if workdir_lib.output_error(failure, workdir) is not None:
      raise  # A full disk or a vanished workdir stops the run.
    counts['failed'] += 1
    logging.warning('cannot write the outputs of %s: %s', _display(path), failure)
    row[-1] = f'outputs not written: {type(failure).__name__}: {failure}'
  return row


def _write_outputs(workdir, name, model, output, score, anomaly_map, image, size):
  stem = os.path.splitext(name)[0]
  cal = model.calibration
  if output.save_maps:
    files.save_npy(os.path.join(workdir, 'maps', stem + '.npy'), anomaly_map.astype(np.float32))
  if cal.image_threshold is None:
    return
  if output.overlays:
    vmin, vmax = cal.color_range
    lines, ticks = visualize.caption(_display(name), score, cal)
    files.save_png(os.path.join(workdir, 'overlays', stem + '.png'), visualize.labelled_overlay(
        image, anomaly_map, None, vmin=vmin, vmax=vmax, lines=lines, ticks=ticks))
  if output.masks:
    full = transforms.map_to_original(anomaly_map, size, **model.settings.image_config)
    files.save_png(os.path.join(workdir, 'masks', stem + '.png'),
                   np.where(full > cal.pixel_threshold, 255, 0).astype(np.uint8))


def exit_status(summary):
  return summary['exit_status']
