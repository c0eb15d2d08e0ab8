r"""The docs' measured tables, generated from the result files under docs/results/.

  python docs/make_tables.py            # rewrites every generated table in README.md and docs/
  python docs/make_tables.py record NAME -- python launch.py --config=... --workdir=W

`record` runs the command, measures its wall clock and peak resident memory, and keeps its
result files (those of KEPT present in W: results, config, summaries, score tables) in
docs/results/NAME/, with run.json (the command, exit status,
wall seconds, peak RSS, machine, date, commit). Environment variables in the command ($R, ...)
are expanded to run it and written back in the kept files, so no machine's paths are
committed; W becomes WORKDIR. Then the tables are regenerated.

A generated table sits between `<!-- table:NAME -->` and `<!-- /table -->` in a Markdown file;
NAME is a function of TABLES below. Numbers are never typed into those blocks: record the run
again instead.
"""
import datetime
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import time

DOCS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(DOCS)
sys.path.insert(0, ROOT)  # The tables of benchmarks and sweeps use the package's own renderers.
RESULTS = os.path.join(DOCS, 'results')
KEPT = ('results.json', 'config.json', 'summary.json', 'benchmark.json', 'sweep.json',
        'timings.json', 'scale.json', 'predictions.csv', 'scores', 'soak.json', 'gpu_check.json')


def _machine():
  model = platform.machine()
  try:
    with open('/proc/cpuinfo') as f:
      model = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
  except (OSError, StopIteration):
    pass
  return f'{model}, {os.cpu_count()} CPU cores'


def _commit():
  try:
    return subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return ''


def record(name, command):
  """Runs `command` (a list of words) and keeps its results in docs/results/NAME/."""
  text = ' '.join(command)
  variables = {v: os.environ[v] for v in set(re.findall(r'\$(\w+)', text)) if v in os.environ}
  words = [os.path.expandvars(w) for w in command]
  workdir = next((w.split('=', 1)[1] for w in words if w.startswith('--workdir=')), None)
  if workdir is None:
    sys.exit('error: the command needs --workdir=DIR')
  start = time.perf_counter()
  status = subprocess.run(words, cwd=ROOT).returncode
  wall = time.perf_counter() - start
  peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # Linux: KiB -> MiB.
  replacements = [(os.path.abspath(workdir), 'WORKDIR'), (workdir, 'WORKDIR')] + [
      (value.rstrip('/'), f'${key}') for key, value in sorted(variables.items(),
                                                              key=lambda kv: -len(kv[1]))]
  out = os.path.join(RESULTS, name)
  shutil.rmtree(out, ignore_errors=True)
  os.makedirs(out)
  for kept in KEPT:
    path = os.path.join(workdir, kept)
    files = ([os.path.join(kept, n) for n in sorted(os.listdir(path))] if os.path.isdir(path)
             else [kept] if os.path.isfile(path) else [])
    for file in files:
      with open(os.path.join(workdir, file), newline='') as f:  # Line endings as written.
        content = f.read()
      for old, new in replacements:
        content = content.replace(old, new)
      os.makedirs(os.path.dirname(os.path.join(out, file)), exist_ok=True)
      with open(os.path.join(out, file), 'w', newline='') as f:
        f.write(content)
  for old, new in replacements[:2]:
    text = text.replace(old, new)
  run = {'command': text, 'exit_status': status, 'wall_seconds': round(wall, 1),
         'peak_rss_mb': round(peak), 'machine': _machine(),
         'date': datetime.date.today().isoformat(), 'commit': _commit()}
  with open(os.path.join(out, 'run.json'), 'w') as f:
    json.dump(run, f, indent=2)
    f.write('\n')
  print(f'{name}: exit {status}, {wall:.1f} s, peak RSS {peak:.0f} MiB')
  return status


def _load(name, file):
  """docs/results/NAME/FILE as JSON, or None."""
  path = os.path.join(RESULTS, name, file)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return json.load(f)


TABLES = {}


def table(function):
  """Registers a table function (its name is the marker's NAME)."""
  TABLES[function.__name__] = function
  return function


def _pct(value):
  return 'n/a' if value is None else f'{100 * value:.2f}'


def _ref(value, reference, fmt=_pct):
  return fmt(value) + (f' ({fmt(reference)})' if reference is not None else '')


def _recorded(name):
  run = _load(name, 'run.json')
  return f'{run["date"]}, {run["commit"]}' if run else ''


# (recorded run, backbone, data, coreset) of the results table, in order.
RESULT_ROWS = (
    ('bottle_vgg16_10', 'VGG16', 'MVTec bottle', '10 %'),
    ('bottle_vgg16_1', 'VGG16', 'MVTec bottle', '1 %'),
    ('bottle_lite2_10', 'EfficientNet-Lite2', 'MVTec bottle', '10 %'),
    ('bottle_lite2_1', 'EfficientNet-Lite2', 'MVTec bottle', '1 %'),
    ('mtd_vgg16_1', 'VGG16', 'MTD', '1 %'),
    ('mtd_lite2_1', 'EfficientNet-Lite2', 'MTD', '1 %'),
    ('demo', 'EfficientNet-Lite2', 'demo', '10 %'),
)


@table
def results():
  """Metrics, bank, fit and inference time per recorded experiment, beside the official code's."""
  references = _load('.', 'reference.json') or {}
  lines = ['| backbone | data | coreset | memory bank | image AUROC | pixel AUROC | AU-PRO | '
           'misclassified | fit s | ms / image |', '|---|---|---|---|---|---|---|---|---|---|']
  for name, backbone, data, coreset in RESULT_ROWS:
    records = _load(name, 'results.json')
    if records is None:
      continue
    ref = references.get(name, {})
    for category, r in records.items():
      label = data if len(records) == 1 else f'{data} {category}'
      lines.append(
          f'| {backbone} | {label} | {coreset} | {r["memory_bank_size"]:,} | '
          f'{_ref(r["image_auroc"], ref.get("image_auroc"))} | '
          f'{_ref(r["pixel_auroc"], ref.get("pixel_auroc"))} | '
          f'{_ref(r["au_pro"], ref.get("au_pro"))} | '
          f'{r.get("misclassified", "n/a")} / {r["num_test_images"]} | '
          f'{_ref(r["fit_seconds"], ref.get("fit_seconds"), lambda v: f"{v:.0f}")} | '
          f'{_ref(1000 * r["inference_seconds_per_image"], ref.get("ms_per_image"), lambda v: f"{v:.0f}")} |')
  return '\n'.join(lines)


def _command_lines(names):
  """An indented command line per recorded run of `names`, with its name, date and commit."""
  return [f'    {run["command"]}  # {name}: {_recorded(name)}' for name in names
          for run in [_load(name, 'run.json')] if run]


@table
def commands():
  """The recorded experiments' commands, with their date and commit."""
  return '\n'.join(_command_lines(name for name, *_ in RESULT_ROWS))


@table
def breakdown():
  """Where the wall clock of the 10 % bottle runs and the MTD runs went."""
  names = [n for n in ('bottle_vgg16_10', 'bottle_lite2_10', 'mtd_vgg16_1', 'mtd_lite2_1')
           if _load(n, 'results.json')]
  parts = ('compile', 'fit_decode_wait', 'fit_features', 'coreset', 'test_decode_wait',
           'test_features', 'test_knn_maps', 'test_other', 'metrics', 'writing', 'other')
  lines = ['| seconds | ' + ' | '.join(names) + ' |', '|---|' + '---|' * len(names)]
  runs = [_load(n, 'run.json') for n in names]
  timings = [next(iter(_load(n, 'results.json').values()))['timings'] for n in names]
  lines.append('| launcher wall clock | ' + ' | '.join(f'{r["wall_seconds"]:.1f}' for r in runs) + ' |')
  lines.append('| inside the category | ' + ' | '.join(f'{t["wall"]:.1f}' for t in timings) + ' |')
  for part in parts:
    lines.append(f'| {part.replace("_", " ")} | ' + ' | '.join(f'{t[part]:.1f}' for t in timings)
                 + ' |')
  lines.append('| peak RSS (MiB) | ' + ' | '.join(f'{r["peak_rss_mb"]:,}' for r in runs) + ' |')
  return '\n'.join(lines)


def _csv(name, file):
  import csv  # pylint: disable=g-import-not-at-top
  path = os.path.join(RESULTS, name, file)
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return list(csv.DictReader(f))


@table
def deployment():
  """The predict job on bottle's test images with the Lite2 10 % model, and a holdout fit."""
  lines = ['| what | measured |', '|---|---|']
  fit = _load('bottle_lite2_10', 'results.json')
  summary = _load('bottle_lite2_predict', 'summary.json')
  if fit and summary:
    run = _load('bottle_lite2_predict', 'run.json')
    rows = _csv('bottle_lite2_predict', 'predictions.csv') or []
    scores = {r['path'].split('bottle/test/', 1)[-1]: r['score']
              for r in _csv('bottle_lite2_10', 'scores/bottle.csv') or []}
    equal = sum(scores.get(r['path']) == r['score'] for r in rows)
    bank = fit['bottle']['memory_bank_size']
    lines += [
        f'| model on disk | `bank.npz` {bank:,} x 1024 float32 ({bank * 4096 / 2**20:.1f} MiB) and '
        '`model.json` |',
        f'| predict job on `bottle/test` (900 x 900 PNGs; decoding, overlays and masks at 900 x 900 '
        f'included) | {summary["num_scored"]} images scored, {summary["num_failed"]} failed; '
        f'{summary["images_per_second"]:.1f} images/s, compute {1000 * summary["compute_seconds_per_image"]:.0f} '
        f'ms per image, peak RSS {summary["peak_rss_mb"]:,.0f} MB; the launcher process '
        f'{run["wall_seconds"]:.1f} s in all |',
        f'| its scores against the experiment run\'s `scores/bottle.csv` | {equal} of {len(rows)} '
        'equal to the last digit |',
    ]
  holdout = _load('bottle_lite2_holdout', 'results.json')
  if holdout:
    r = holdout['bottle']
    lines.append(
        f'| calibration: `--config.calibration.holdout=0.1` | threshold {r["image_threshold"]:,.1f} '
        f'from {r["num_holdout_images"]} held-out good images ({r["image_threshold_source"]}); at '
        f'it, test FPR {r["test_fpr_at_threshold"]:.3f} and TPR {r["test_tpr_at_threshold"]:.3f}; '
        f'{_pct(r["image_auroc"])} / {_pct(r["pixel_auroc"])} / {_pct(r["au_pro"])} with the '
        f'bank of {r["num_train_images"]} images ({r["memory_bank_size"]:,} patches) |')
  if fit:
    r = fit['bottle']
    lines.append(f'| the F1-optimal thresholds without holdout | image {r["f1_image_threshold"]:,.1f} '
                 f'(F1 {r["image_f1"]:.3f}, {r["misclassified"]} misclassified), pixel '
                 f'{r["f1_pixel_threshold"]:,.1f} |')
  lines += ['', 'Commands:', '']
  lines += _command_lines(('bottle_lite2_10', 'bottle_lite2_predict', 'bottle_lite2_holdout'))
  return '\n'.join(lines)


@table
def soak():
  """The predict job over 20,000 images: throughput, memory over time, SIGKILL resumes."""
  s = _load('soak_predict', 'soak.json')
  if s is None:
    return '(not recorded: python docs/make_tables.py record soak_predict -- python tests/soak_predict.py --workdir=W)'
  memory = {m['images']: m for m in s['memory']}
  marks = [n for n in (1000, 5000, 10000, 15000, 20000) if n in memory]
  at_kill = ', '.join(f'{k["rows_at_kill"]:,}' for k in s['kills'])
  counts = ' / '.join(f'{n:,}' for n in marks)
  rss = ' / '.join(f'{memory[n]["rss_mb"]:.0f}' for n in marks)
  lines = [
      '| what | measured |', '|---|---|',
      f'| input | {s["images"]:,} list entries: the demo\'s 51 generated `tiles` test images (128 px) '
      'over and over; the demo model (EfficientNet-Lite2, 10 %); masks on, overlays off |',
      f'| uninterrupted ({_load("soak_predict", "run.json")["machine"]}) | {s["full_seconds"]:.0f} s '
      f'with start-up: {s["full_images_per_second"]:.1f} images/s, compute '
      f'{s["full_compute_ms_per_image"]:.1f} ms per image |',
      f'| RSS after {counts} images | {rss} MB (peak {memory[marks[0]]["peak_rss_mb"]:.0f} -> '
      f'{memory[marks[-1]]["peak_rss_mb"]:.0f} MB) |',
      f'| killed with SIGKILL {len(s["kills"])} times (rows in the CSV at each kill) | {at_kill}; '
      'each time resumed with `--config.resume=True` |',
      f'| the resumed CSV against the uninterrupted one | '
      f'{"equal row for row and score for score" if s["equal"] else "DIFFERENT"}: '
      f'{s["rows"][1]:,} and {s["rows"][0]:,} rows |',
      '', 'Command:', '']
  return '\n'.join(lines + _command_lines(('soak_predict',)))

@table
def diskbank():
  """MTD with VGG16 at 1 %, the bank in memory against streamed to a file."""
  lines = ['| bank | image / pixel AUROC / AU-PRO | memory bank | fit s | peak RSS (MiB) | recorded |',
           '|---|---|---|---|---|---|']
  for name, label in (('mtd_vgg16_1', 'in memory'), ('mtd_vgg16_1_disk', 'streamed to a file')):
    results, run = _load(name, 'results.json'), _load(name, 'run.json')
    if results:
      r = results['mtd']
      lines.append(f'| {label} | {_pct(r["image_auroc"])} / {_pct(r["pixel_auroc"])} / '
                   f'{_pct(r["au_pro"])} | {r["memory_bank_size"]:,} of '
                   f'{r["num_train_images"] * 784:,} rows | {r["fit_seconds"]:.0f} | '
                   f'{run["peak_rss_mb"]:,} | {_recorded(name)} |')
  return '\n'.join(lines)


def _records(name):
  from patchcore_jax import timing  # pylint: disable=g-import-not-at-top
  return [timing.Record(**r) for r in _load(name, 'benchmark.json') or []]


@table
def benchmark():
  """The benchmark job's table (`timing.markdown`) of the recorded full run."""
  from patchcore_jax import timing  # pylint: disable=g-import-not-at-top
  name = 'benchmark_wide_resnet50_2'
  run = _load(name, 'run.json')
  if not run:
    return '(not recorded yet)'
  header = [f'`{run["command"]}`; {run["machine"]}; {_recorded(name)}.', '']
  return timing.markdown(_records(name), header=header)


BACKBONES = ('wide_resnet50_2', 'resnet18', 'vgg16', 'efficientnet_lite0', 'efficientnet_lite2',
             'mobilenet_v2')


@table
def backbones():
  """Forward-pass times per recorded backbone benchmark."""
  lines = ['| backbone | stages | compile | ms / image, jit | ms / image, eager | recorded |',
           '|---|---|---|---|---|---|']
  for backbone in BACKBONES:
    name = f'backbone_{backbone}'
    rows = {r.mode: r for r in _records(name) if r.stage == 'backbone'}
    if 'jit' not in rows:
      continue
    jit, eager = rows['jit'], rows.get('eager')
    stages = jit.size.split(' to ')[1].split(',')[0]
    lines.append(f'| `{backbone}` | {stages} | {jit.compile_seconds:.1f} s | '
                 f'{1000 * jit.median_seconds:.1f} | '
                 f'{"" if eager is None else f"{1000 * eager.median_seconds:.0f}"} | '
                 f'{_recorded(name)} |')
  return '\n'.join(lines)


# (recorded sweep, data) of the mixed-precision table, in order.
PRECISION = (('precision_bottle', 'MVTec bottle'), ('precision_mtd', 'MTD'))


@table
def precision():
  """float32 against bfloat16 backbones, measured side by side in one sweep per dataset."""
  lines = ['| data | backbone | coreset | dtype | image AUROC | pixel AUROC | AU-PRO | embedding '
           'ms / image | search ms / image | ms / image |', '|---|---|---|---|---|---|---|---|---|---|']
  commands = []
  for name, data in PRECISION:
    records = _load(name, 'sweep.json')
    if not records:
      continue
    base = {(r['variant']['backbone'], r['variant'].get('percentage')): r for r in records
            if r['variant'].get('dtype') == 'float32'}
    for r in records:
      v = r['variant']
      f32 = base.get((v['backbone'], v.get('percentage')))
      change = lambda key, scale=100: '' if f32 is None or v['dtype'] == 'float32' or \
          r[key] is None else f' ({scale * (r[key] - f32[key]):+.2f})'
      speed = '' if f32 is None or v['dtype'] == 'float32' else \
          f' ({f32["ms_per_image"] / r["ms_per_image"]:.2f}x)'
      lines.append(
          f'| {data} | {v["backbone"]} | {100 * v["percentage"]:g} % | {v["dtype"]} | '
          f'{_pct(r["image_auroc"])}{change("image_auroc")} | '
          f'{_pct(r["pixel_auroc"])}{change("pixel_auroc")} | {_pct(r["au_pro"])}{change("au_pro")} '
          f'| {r["embed_ms_per_image"]:.1f} | {r["score_ms_per_image"]:.1f} | '
          f'{r["ms_per_image"]:.1f}{speed} |')
    run = _load(name, 'run.json')
    commands.append(f'    {run["command"]}  # {name}: {run["wall_seconds"]:.0f} s, '
                    f'{run["machine"]}, {_recorded(name)}')
  if not commands:
    return '(not recorded: python docs/make_tables.py record precision_bottle -- python launch.py --config=configs/precision.py ...)'
  return '\n'.join(lines + ['', 'Commands:', ''] + commands)


@table
def gpu_check_cpu():
  """The GPU check's stored CPU reference (the check run with allow_cpu=True)."""
  from patchcore_jax.jobs import gpu_check  # pylint: disable=g-import-not-at-top
  report = _load('gpu_check_cpu', 'gpu_check.json')
  if report is None:
    return '(not recorded: python docs/make_tables.py record gpu_check_cpu -- python launch.py --config=configs/gpu_check.py --config.allow_cpu=True ...)'
  run = _load('gpu_check_cpu', 'run.json')
  body = gpu_check.markdown(report).split('\n', 2)[2].replace('\n## ', '\n#### ')
  return body.rstrip('\n') + f'\n\n`{run["command"]}`: {_recorded("gpu_check_cpu")}.'


# (recorded sweep, title) of the paper page, in order.
PAPER = (
    ('paper_table1', 'Tables 1-3: PatchCore-25/10/1 %'),
    ('paper_table5', 'Table 5: inference time, exact and IVF-PQ'),
    ('paper_table4_resolution', 'Table 4: image size'),
    ('paper_table4_hierarchies', 'Table 4: hierarchies'),
    ('paper_table4_ensemble', 'Table 4: backbones and their ensemble'),
    ('paper_fig4_patch_size', 'Fig. 4 (top): neighbourhood size'),
    ('paper_fig4_hierarchies', 'Fig. 4 (bottom): feature hierarchy'),
    ('paper_stride', 'Sec. 4.4.2: neighbourhood stride'),
    ('paper_fig5', 'Fig. 5: subsampling'),
    ('paper_lowshot', 'Table S5: low-shot (mean ± std over seeds)'),
    ('paper_table6', 'Table 6: Magnetic Tile Defects'),
    ('paper_comparison_bottle', 'Tables 1-3: PatchCore beside PaDiM, SPADE and MahalanobisAD, bottle'),
    ('paper_comparison_mtd', 'Tables 1-3 and 6: PatchCore beside PaDiM, SPADE and MahalanobisAD, MTD'),
)


@table
def paper():
  """A table per recorded paper sweep: the variant fields that vary, metrics, bank, time."""
  from patchcore_jax.jobs import sweep_report  # pylint: disable=g-import-not-at-top
  out = []
  for name, title in PAPER:
    records = _load(name, 'sweep.json')
    if not records:
      continue
    run = _load(name, 'run.json')
    out += [f'### {title}', '', f'`{run["command"]}`: {run["wall_seconds"]:.0f} s in all, peak '
            f'RSS {run["peak_rss_mb"]:,} MiB; {_recorded(name)}.', '']
    keys = sweep_report.varying(records)
    if 'shot_seed' in keys:
      groups = sweep_report.aggregate(records, 'shot_seed')
      out += sweep_report.stats_table(groups, [k for k in keys if k != 'shot_seed'], '')[2:]
    else:
      out += sweep_report.variant_table(records, keys) + ['']
  return '\n'.join(out) if out else '(no sweep recorded yet)'


_BLOCK = re.compile(r'(<!-- table:(\w+) -->\n)(.*?)(<!-- /table -->)', re.S)


def render(text, path='text'):
  """(`text` with every table block regenerated, the names of the blocks)."""
  names = []

  def fill(match):
    name = match.group(2)
    if name not in TABLES:
      sys.exit(f'error: {path}: no table function {name!r} (known: {sorted(TABLES)})')
    names.append(name)
    return match.group(1) + TABLES[name]().rstrip('\n') + '\n' + match.group(4)

  return _BLOCK.sub(fill, text), names


def markdown_files():
  """README.md and docs/*.md."""
  return [os.path.join(ROOT, 'README.md')] + sorted(
      os.path.join(DOCS, n) for n in os.listdir(DOCS) if n.endswith('.md'))


def rewrite(path):
  """Regenerates every table block of one Markdown file; returns the names it rewrote."""
  with open(path) as f:
    text = f.read()
  new, names = render(text, path)
  if new != text:
    with open(path, 'w') as f:
      f.write(new)
  return names


def rewrite_all():
  for path in markdown_files():
    names = rewrite(path)
    if names:
      print(f'{os.path.relpath(path, ROOT)}: {", ".join(names)}')


def main(argv):
  if len(argv) > 1 and argv[1] == 'record':
    if len(argv) < 5 or argv[3] != '--':
      sys.exit('usage: python docs/make_tables.py record NAME -- COMMAND ...')
    status = record(argv[2], argv[4:])
    if status:
      sys.exit(status)
  rewrite_all()


if __name__ == '__main__':
  main(sys.argv)
