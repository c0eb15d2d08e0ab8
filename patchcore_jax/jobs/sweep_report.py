"""The sweep's report: report.md (tables per category, means and stds over seeds and categories,
the paper's statements beside ours) and its PNG charts (a metric against a variant axis;
image-level ROC and precision-recall curves, Fig. S3)."""
import numpy as np
from sklearn import metrics as sk_metrics

from patchcore_jax.jobs import charts

_METRICS = ('image_auroc', 'pixel_auroc', 'au_pro')


def _pct(value):
  return 'n/a' if value is None else f'{100 * value:.2f}'


def _fmt_value(key, value):
  if key == 'percentage' and isinstance(value, (int, float)):
    return f'{100 * value:g} %'
  return str(value)


def varying(records):
  """The variant fields whose value differs between records (the report's columns)."""
  keys = list(dict.fromkeys(k for r in records for k in r['variant']))
  return [k for k in keys if len({repr(r['variant'].get(k)) for r in records}) > 1]


def _label(variant, keys=None):
  keys = keys if keys is not None else [k for k in ('subsampler', 'proxy_sign') if k in variant]
  return ' '.join(_fmt_value(k, variant[k]) for k in keys if k in variant) or 'all'


def aggregate(records, over):
  """Mean and std of the metrics over the variant field `over` (seeds) or over categories
  (over='category'): a list of (variant without it, {metric: (mean, std, count)})."""
  groups = {}
  for r in records:
    key = tuple((k, v) for k, v in r['variant'].items() if k != over)
    groups.setdefault(key, []).append(r)
  out = []
  for key, rs in groups.items():
    stats = {}
    for m in _METRICS + ('misclassified',):
      values = [r[m] for r in rs if r.get(m) is not None]
      if values:
        stats[m] = (float(np.mean(values)), float(np.std(values)), len(values))
    out.append((dict(key), stats))
  return out


def variant_table(records, keys):
  """Markdown lines: a row per record, the `keys` columns and the metrics, bank, usage, times."""
  approximate = any('recall_at_1' in r for r in records)
  head = [k.replace('_', ' ') for k in keys] + [
      'bank', 'image AUROC', 'pixel AUROC', 'AU-PRO', 'misclassified', 'bank usage',
      'ms / image', 'subsample s', 'score s'] + (['recall@1', 'index s'] if approximate else [])
  lines = ['| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  number = lambda r, field, fmt: format(r[field], fmt) if r.get(field) is not None else '-'
  for r in records:
    v = r['variant']
    cells = [_fmt_value(k, v.get(k, '')) for k in keys] + [
        number(r, 'memory_bank_size', ','), _pct(r['image_auroc']), _pct(r['pixel_auroc']),
        _pct(r['au_pro']), str(r['misclassified']),
        _pct(r['memory_bank_usage']) if r.get('memory_bank_usage') is not None else '-',
        number(r, 'ms_per_image', '.1f'), number(r, 'subsample_seconds', '.1f'),
        number(r, 'score_seconds', '.1f')]
    if approximate:
      cells += [number(r, 'recall_at_1', '.3f'), number(r, 'index_seconds', '.1f')]
    lines.append('| ' + ' | '.join(cells) + ' |')
  return lines


def stats_table(groups, keys, title, *, total_misclassified=False):
  """Mean ± std of the metrics per group; with `total_misclassified`, also the sum of the
  misclassified counts (Table 1's last row, over categories)."""
  head = [k.replace('_', ' ') for k in keys] + ['n', 'image AUROC', 'pixel AUROC', 'AU-PRO']
  head += ['misclassified (total)'] if total_misclassified else []
  lines = [title, '', '| ' + ' | '.join(head) + ' |', '|' + '---|' * len(head)]
  for variant, stats in groups:
    cell = lambda m: (f'{100 * stats[m][0]:.2f} ± {100 * stats[m][1]:.2f}' if m in stats
                      else 'n/a')
    n = max((s[2] for s in stats.values()), default=0)
    total = []
    if total_misclassified:
      mis = stats.get('misclassified')
      total = [str(int(round(mis[0] * mis[2]))) if mis else 'n/a']
    lines.append('| ' + ' | '.join([_fmt_value(k, variant.get(k, '')) for k in keys]
                                   + [str(n)] + [cell(m) for m in _METRICS] + total) + ' |')
  return lines + ['']


def report(records, config, timings):
  """report.md: a table per category (the variant fields that vary, the metrics, bank, usage,
  time per image), means and stds over seeds and categories, the paper's statements."""
  lines = [f'# Sweep: {config.backbone.name}, {config.data.name}', '']
  keys = varying(records)
  for name in dict.fromkeys(r['category'] for r in records):
    rs = [r for r in records if r['category'] == name]
    lines += [f'## {name}', ''] + variant_table(rs, keys) + ['']
    t = timings.get(name, {})
    for f in t.get('features', []):
      lines.append(f'Features {f["feature_variant"]} (extracted once): {f["seconds"]:.1f} s, '
                   f'{f["embed_ms_per_image"]:.1f} ms per test image, {f["bank_rows"]:,} bank '
                   'rows.')
    lines += [f'The whole category: {t.get("total_seconds", 0):.1f} s.', '']
    notes = dict.fromkeys(f'- n/a {metric}: {why}' for r in rs
                          for metric, why in r.get('metric_notes', {}).items())
    lines += list(notes) + [''] * bool(notes)
    if 'shot_seed' in keys:
      lines += stats_table(aggregate(rs, 'shot_seed'), [k for k in keys if k != 'shot_seed'],
                            f'### {name}: mean ± std over {len(config.sweep.seeds)} seeds')
  categories = list(dict.fromkeys(r['category'] for r in records))
  if len(categories) > 1:
    groups = aggregate([dict(r, variant=dict(r['variant'], category=r['category']))
                        for r in records], 'category')
    lines += stats_table(groups, keys, f'## Mean ± std over {len(categories)} categories',
                          total_misclassified=True)
  lines += [f'Wall clock: {timings.get("wall_seconds", 0):.1f} s.', '', '## The paper', '']
  lines += [f'- {line}' for line in config.sweep.paper_statements] + ['']
  return '\n'.join(lines)


def plot(records, metric, *, size=(600, 380)):
  """A PNG (numpy uint8) of `metric` against the first varying numeric variant field (the
  percentage, patch size, stride, shots, image size; evenly spaced), a line per value of the
  other varying fields; None when no record has the metric."""
  records = [r for r in records if r.get(metric) is not None]
  if not records:
    return None
  keys = varying(records)
  axis = next((k for k in ('percentage', 'patch_size', 'stride', 'shots', 'image_size',
                           'hierarchy', 'nprobe', 'k') if k in keys), None)
  xs = sorted({r['variant'].get(axis) for r in records}, key=lambda v: (str(type(v)), v)) \
      if axis else [None]
  rest = [k for k in keys if k != axis and k != 'shot_seed']
  points = {}
  for r in records:
    points.setdefault(_label(r['variant'], rest), {}).setdefault(
        xs.index(r['variant'].get(axis)), []).append(r[metric])
  w, h = size
  left, right, top, bottom = 60, 170, 30, 40
  ys = [np.mean(v) for pts in points.values() for v in pts.values()]
  y0, y1 = min(ys), max(ys)
  y0, y1 = (y0 - 0.01, y1 + 0.01) if y1 - y0 < 0.02 else (y0 - 0.05 * (y1 - y0), y1 + 0.05 * (y1 - y0))
  px = lambda i: left + (i + 0.5) / len(xs) * (w - left - right)
  py = lambda y: h - bottom - (y - y0) / (y1 - y0) * (h - top - bottom)
  image, draw = charts.canvas(size, f'{metric} against {axis or "variant"}' + (
      ' (mean over seeds)' if 'shot_seed' in keys else ''))
  charts.frame(draw, left, top, w - right, h - bottom)
  for i, x in enumerate(xs):
    draw.line([px(i), h - bottom, px(i), h - bottom + 4], fill='black')
    draw.text((px(i) - 14, h - bottom + 8), _fmt_value(axis, x) if axis else '', fill='black')
  for frac in np.linspace(0, 1, 5):
    y = y0 + frac * (y1 - y0)
    draw.text((4, py(y) - 6), f'{y:.3f}', fill='black')
  entries = []
  for j, (label, pts) in enumerate(sorted(points.items())):
    colour = charts.COLOURS[j % len(charts.COLOURS)]
    charts.series(draw, [(px(i), py(float(np.mean(v)))) for i, v in sorted(pts.items())], colour)
    entries.append((label[:26], colour))
  charts.legend(draw, w - right + 10, top, entries)
  return np.asarray(image)


def curve_plot(records, scores, labels, kind, *, size=(600, 420), max_lines=10):
  """Image-level ROC (kind='roc') or precision-recall ('pr') curves of up to `max_lines`
  variants of one category (Fig. S3), as a PNG (numpy uint8); None with one class only."""
  labels = np.asarray(labels)
  if labels.min() == labels.max():
    return None
  keys = varying(records) or ['subsampler']
  w, h = size
  left, right, top, bottom = 50, 200, 30, 40
  px = lambda x: left + x * (w - left - right)
  py = lambda y: h - bottom - y * (h - top - bottom)
  title = 'ROC (image level)' if kind == 'roc' else 'precision-recall (image level)'
  image, draw = charts.canvas(size, title)
  charts.frame(draw, left, top, w - right, h - bottom)
  for v in (0.0, 0.5, 1.0):
    draw.text((px(v) - 8, h - bottom + 8), f'{v:g}', fill='black')
    draw.text((8, py(v) - 6), f'{v:g}', fill='black')
  draw.text((px(0.5) - 30, h - bottom + 22), 'FPR' if kind == 'roc' else 'recall', fill='black')
  entries = []
  for j, (r, s) in enumerate(list(zip(records, scores))[:max_lines]):
    if kind == 'roc':
      x, y, _ = sk_metrics.roc_curve(labels, s)
      value = f'AUROC {100 * r["image_auroc"]:.1f}'
    else:
      y, x, _ = sk_metrics.precision_recall_curve(labels, s)
      value = f'AP {100 * sk_metrics.average_precision_score(labels, s):.1f}'
    colour = charts.COLOURS[j % len(charts.COLOURS)]
    charts.series(draw, [(px(a), py(b)) for a, b in zip(x, y)], colour, markers=False)
    entries.append((f'{_label(r["variant"], keys)[:18]} {value}', colour))
  charts.legend(draw, w - right + 10, top, entries)
  return np.asarray(image)
