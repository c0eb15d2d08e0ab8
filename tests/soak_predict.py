r"""Soak test of the predict job: a long list of images, memory over time, and SIGKILL resumes.

  python tests/soak_predict.py --workdir=W [--images=20000] [--kills=5] [--seed=0]

1. Fits the demo 'tiles' model (EfficientNet-Lite2, 128 px, 20 training images) into W/fit.
2. Writes W/list.txt: the 51 generated test images listed over and over, --images lines.
3. Runs the predict job over the list without interruption (W/full): wall clock, throughput and
   the memory trace of its summary.json (RSS every 1,000 images).
4. Runs it again into W/killed, killing it with SIGKILL at --kills random moments (after a
   random number of rows has reached predictions.csv, plus a random fraction of a batch's time,
   so the kills land anywhere in a batch) and resuming it with --config.resume=True each time.
5. Checks that the two predictions.csv are equal row for row and score for score, and writes
   W/soak.json with every number (and exits 1 if they differ).
Overlays are off (20,000 PNGs measure the disk); masks are on.
"""
import argparse
import csv
import json
import os
import random
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(args, log):
  return subprocess.Popen([sys.executable, os.path.join(ROOT, 'launch.py'), *args], cwd=ROOT,
                          stdout=log, stderr=subprocess.STDOUT)


def _rows(path):
  """Complete CSV records so far (a record ends with CRLF outside quotes; no quotes here)."""
  try:
    with open(path, 'rb') as f:
      return max(f.read().count(b'\r\n') - 1, 0)
  except OSError:
    return 0


def _predict_args(workdir, model, images, resume=False):
  return ['--config=configs/predict.py', f'--config.model={model}', f'--config.images={images}',
          f'--workdir={workdir}', '--config.output.overlays=False',
          f'--config.resume={resume}']


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--images', type=int, default=20000)
  parser.add_argument('--kills', type=int, default=5)
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  work = os.path.abspath(args.workdir)
  os.makedirs(work, exist_ok=True)
  log = open(os.path.join(work, 'soak.log'), 'a')
  model = os.path.join(work, 'fit', 'models', 'tiles')
  if not os.path.isdir(model):
    proc = _launch(['--config=configs/demo.py:category=tiles', f'--workdir={work}/fit',
                    '--config.data.max_train_images=20', '--config.data.image_size=128',
                    '--config.data.batch_size=4', '--config.output.num_overlays=0'], log)
    if proc.wait() != 0:
      sys.exit(f'fitting the demo model failed: see {work}/soak.log')
  test = os.path.join(work, 'fit', 'data', 'tiles', 'test')
  images = sorted(os.path.join(d, n) for d, _, names in os.walk(test) for n in names)
  listing = os.path.join(work, 'list.txt')
  with open(listing, 'w') as f:
    f.writelines(images[i % len(images)] + '\n' for i in range(args.images))

  start = time.perf_counter()
  if _launch(_predict_args(f'{work}/full', model, listing), log).wait() != 0:
    sys.exit(f'the uninterrupted run failed: see {work}/soak.log')
  full_seconds = time.perf_counter() - start
  with open(os.path.join(work, 'full', 'summary.json')) as f:
    full = json.load(f)

  rng = random.Random(args.seed)
  targets = sorted(rng.randrange(1, args.images) for _ in range(args.kills))
  kills, killed_csv = [], os.path.join(work, 'killed', 'predictions.csv')
  start = time.perf_counter()
  for k, target in enumerate(targets + [None]):
    proc = _launch(_predict_args(f'{work}/killed', model, listing, resume=k > 0), log)
    if target is None:
      if proc.wait() != 0:
        sys.exit(f'the last resumed run failed: see {work}/soak.log')
      break
    while _rows(killed_csv) < target and proc.poll() is None:
      time.sleep(0.01)
    time.sleep(rng.uniform(0.0, 0.2))  # Anywhere within the next batch (~0.1 s here).
    rows_before = _rows(killed_csv)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    kills.append({'target_rows': target, 'rows_at_kill': rows_before,
                  'rows_after_kill': _rows(killed_csv)})
  killed_seconds = time.perf_counter() - start
  with open(os.path.join(work, 'killed', 'summary.json')) as f:
    last = json.load(f)

  def read(path):
    with open(path, newline='', encoding='utf-8', errors='surrogateescape') as f:
      return list(csv.reader(f))

  full_rows, killed_rows = read(os.path.join(work, 'full', 'predictions.csv')), read(killed_csv)
  differing = [i for i, (a, b) in enumerate(zip(full_rows, killed_rows)) if a != b]
  equal = len(full_rows) == len(killed_rows) and not differing
  memory = full['memory']
  result = {
      'images': args.images, 'kills': kills, 'equal': equal,
      'rows': [len(full_rows) - 1, len(killed_rows) - 1], 'first_differing_rows': differing[:5],
      'full_seconds': full_seconds, 'full_images_per_second': full['images_per_second'],
      'full_compute_ms_per_image': 1000 * full['compute_seconds_per_image'],
      'memory': memory,
      'rss_growth_mb_1000_to_end': memory[-1]['rss_mb'] - memory[0]['rss_mb'],
      'peak_rss_growth_mb_1000_to_end': memory[-1]['peak_rss_mb'] - memory[0]['peak_rss_mb'],
      'killed_seconds_with_restarts': killed_seconds,
      'last_resume_num_resumed': last['num_resumed'],
  }
  with open(os.path.join(work, 'soak.json'), 'w') as f:
    json.dump(result, f, indent=2)
  print(json.dumps({k: v for k, v in result.items() if k != 'memory'}, indent=2))
  sys.exit(0 if equal else 1)


if __name__ == '__main__':
  main()
