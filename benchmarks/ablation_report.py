"""The report of benchmarks/ablation.py: tables in the paper's form, its orderings, a chart.

The paper's numbers (Zhao et al. 2017, ADE20K validation, ResNet-50, single scale) are
Table 1 and Table 2 as printed in the paper; PAPER_SOURCE says how they were checked.
"""

import math
import os
import pathlib
import statistics
from typing import Any

RESULTS_MARKER = '<!-- ablation results: everything below is written by benchmarks/ablation.py -->'
DEFAULT_HEADER = (
  '# Pyramid Pooling Module ablations on the synthetic scenes\n\n'
  'Written by `benchmarks/ablation.py` (configs/ablation.py); docs/ablation.md explains the '
  'set-up.\n'
)
CONTEXT_CLASSES = ('car', 'boat', 'cow', 'seal')  # psp_jax.data.synthetic.AMBIGUOUS_PAIRS
# variant: (table, the paper's row, mIoU %, pixel accuracy %).
PAPER = {
  'baseline': (1, 'ResNet50-Baseline', 37.23, 78.01),
  'b1-max': (1, 'ResNet50+B1+MAX', 39.94, 79.46),
  'b1-avg': (1, 'ResNet50+B1+AVE', 40.07, 79.52),
  'b1236-max': (1, 'ResNet50+B1236+MAX', 40.18, 79.45),
  'b1236-avg': (1, 'ResNet50+B1236+AVE', 41.07, 79.97),
  'b1236-max-dr': (1, 'ResNet50+B1236+MAX+DR', 40.87, 79.61),
  'b1236-avg-dr': (1, 'ResNet50+B1236+AVE+DR', 41.68, 80.04),
  'baseline-aux0': (2, 'ResNet50 (without AL)', 35.82, 77.07),
  'baseline-aux0.3': (2, 'ResNet50 (with alpha = 0.3)', 37.01, 77.87),
  'baseline-aux0.6': (2, 'ResNet50 (with alpha = 0.6)', 37.09, 77.84),
  'baseline-aux0.9': (2, 'ResNet50 (with alpha = 0.9)', 36.99, 77.87),
}
TABLE2_BASELINE_ROW = 'ResNet50 (with alpha = 0.4)'  # = Table 1's baseline, 37.23 / 78.01.
TABLE2_ORDER = (
  'baseline-aux0',
  'baseline-aux0.3',
  'baseline',
  'baseline-aux0.6',
  'baseline-aux0.9',
)
PAPER_SOURCE = (
  'Paper numbers: Zhao et al., "Pyramid Scene Parsing Network", CVPR 2017, Table 1 and '
  'Table 2 (ADE20K validation, ResNet-50, single-scale test). Table 1 as given in the '
  "project's issue and in an independent transcription of the paper; Table 2 from that "
  "transcription only (its 35.82 / 77.07 and 37.23 / 78.01 rows reappear in the paper's "
  'Table 4 as ResNet50+DA and ResNet50+DA+AL). Not re-read from the PDF.'
)
# (better, worse, the paper's claim): the paper's row `better` beats its row `worse`.
CLAIMS = (
  ('b1-max', 'baseline', 'pyramid pooling beats the dilated FCN (B1, max)'),
  ('b1236-avg-dr', 'baseline', 'the full PPM beats the dilated FCN'),
  ('b1-avg', 'b1-max', 'average beats max pooling (B1)'),
  ('b1236-avg', 'b1236-max', 'average beats max pooling (B1236)'),
  ('b1236-avg-dr', 'b1236-max-dr', 'average beats max pooling (B1236, DR)'),
  ('b1236-max', 'b1-max', 'four levels beat the global bin (max)'),
  ('b1236-avg', 'b1-avg', 'four levels beat the global bin (average)'),
  ('b1236-max-dr', 'b1236-max', 'dimension reduction helps (max)'),
  ('b1236-avg-dr', 'b1236-avg', 'dimension reduction helps (average)'),
  ('baseline', 'baseline-aux0', 'the auxiliary loss (alpha 0.4) helps'),
  ('baseline', 'baseline-aux0.3', 'alpha 0.4 beats 0.3'),
  ('baseline', 'baseline-aux0.6', 'alpha 0.4 beats 0.6'),
  ('baseline', 'baseline-aux0.9', 'alpha 0.4 beats 0.9'),
)


def context_iou(result: dict[str, Any]) -> float:
  """Mean IoU of the four classes only the scene tells apart (car, boat, cow, seal)."""
  return sum(result['iou'][c] or 0.0 for c in CONTEXT_CLASSES) / len(CONTEXT_CLASSES)


def by_variant(results: list[dict[str, Any]]) -> dict[str, dict[int, dict[str, Any]]]:
  """{variant: {seed: result}}, variants in their first-seen order."""
  out: dict[str, dict[int, dict[str, Any]]] = {}
  for r in results:
    out.setdefault(r['variant'], {})[r['seed']] = r
  return out


def _spread(values: list[float], digits: int = 2) -> str:
  """'mean (min-max)' in percent, or 'mean' for one value."""
  mean = 100 * statistics.fmean(values)
  if len(values) == 1:
    return f'{mean:.{digits}f}'
  return f'{mean:.{digits}f} ({100 * min(values):.{digits}f}–{100 * max(values):.{digits}f})'


def _row(label: str, paper: tuple | None, runs: dict[int, dict[str, Any]]) -> str:
  seeds = sorted(runs)
  cells = [label]
  cells += [f'{paper[2]:.2f}', f'{paper[3]:.2f}'] if paper else ['', '']
  cells.append(_spread([runs[s]['mIoU'] for s in seeds]))
  cells.append(_spread([runs[s]['allAcc'] for s in seeds]))
  cells += [
    f'{100 * statistics.fmean(runs[s]["iou"][c] or 0.0 for s in seeds):.1f}'
    for c in CONTEXT_CLASSES
  ]
  return '| ' + ' | '.join(cells) + ' |'


def _table(rows: list[str], first: str) -> list[str]:
  head = f'| {first} | Paper mIoU | Paper pixel acc. | Ours mIoU | Ours pixel acc. | '
  head += ' | '.join(CONTEXT_CLASSES) + ' |'
  return [head, '|---|' + '---:|' * (4 + len(CONTEXT_CLASSES)), *rows]


def paired(grouped: dict, better: str, worse: str, key=lambda r: r['mIoU']) -> list[float]:
  """better - worse per seed that both ran (same seed: same data order and initial trunk)."""
  seeds = sorted(set(grouped.get(better, {})) & set(grouped.get(worse, {})))
  return [key(grouped[better][s]) - key(grouped[worse][s]) for s in seeds]


def verdict(diffs: list[float]) -> str:
  """Whether our paired differences show the paper's order (better - worse > 0)."""
  n = len(diffs)
  seeds = f'{n} seed' + ('s' if n > 1 else '')
  if all(d > 0 for d in diffs):
    return f'reproduced ({seeds})' if n > 1 else 'same order (1 seed only)'
  if all(d < 0 for d in diffs):
    return f'reversed ({seeds})' if n > 1 else 'reversed (1 seed only)'
  if statistics.fmean(diffs) > 0:
    return f'same order on average, not in every seed ({seeds})'
  return f'not reproduced: reversed on average, not in every seed ({seeds})'


def claims(grouped: dict) -> list[dict[str, Any]]:
  """The paper's orderings that both of whose variants ran, with our paired differences."""
  out = []
  for better, worse, text in CLAIMS:
    diffs = paired(grouped, better, worse)
    if not diffs:
      continue
    ctx = paired(grouped, better, worse, key=context_iou)
    out.append(
      dict(
        better=better,
        worse=worse,
        text=text,
        diffs=diffs,
        context=ctx,
        paper=PAPER[better][2] - PAPER[worse][2],
        verdict=verdict(diffs),
      )
    )
  return out


def _signed(values: list[float]) -> str:
  mean = 100 * statistics.fmean(values)
  if len(values) == 1:
    return f'{mean:+.2f}'
  return f'{mean:+.2f} ({100 * min(values):+.2f} to {100 * max(values):+.2f})'


def markdown(results: list[dict[str, Any]], env: dict[str, Any]) -> str:
  """The results section: set-up, Table 1, Table 2, the orderings, per-run numbers, chart."""
  grouped = by_variant(results)
  setup = results[0]['setup']
  data = results[0]['config']['data']
  lines = [RESULTS_MARKER, '', '## Results', '']
  if env.get('quick'):
    lines += ['**Smoke run (--quick): tiny network and data, numbers mean nothing.**', '']
  lines += [
    f'`{env["command"]}` on {env["date"]}: {env["steps"]} steps per run at batch '
    f'{results[0]["config"]["batch_size"]}, {data["synthetic"]["image_size"]}-pixel scenes, '
    f'{data["crop_size"]}-pixel crops, '
    f'seed{"s" if len(env["seeds"]) > 1 else ""} {", ".join(map(str, env["seeds"]))}; '
    f'jax {env["jax"]}, {env["machine"]}. '
    f'{len(results)} runs took {env["total_seconds"] / 60:.1f} min of training and '
    'evaluation in all.',
    '',
    f'Ours: psp_jax.evaluate on the {setup["images"]} validation images (official '
    f'protocol: mean over all 11 classes; {setup["mode"]} image, '
    f'{"with" if setup["flip"] else "without"} the flip), in %, mean over seeds '
    '(min–max). car, boat, cow, seal: the IoU (%, mean over seeds) of the classes only the '
    'scene tells apart.',
    '',
  ]
  table1 = [v for v in PAPER if PAPER[v][0] == 1 and v in grouped]
  if table1:
    lines += ['### Table 1: pyramid pooling settings', '']
    rows = [_row(f'{PAPER[v][1]} (`{v}`)', PAPER[v], grouped[v]) for v in table1]
    lines += [*_table(rows, 'Method'), '']
  table2 = [v for v in TABLE2_ORDER if v in grouped and (v != 'baseline' or len(grouped) > 1)]
  if any(v != 'baseline' for v in table2):
    lines += ['### Table 2: auxiliary loss weight (dilated FCN, no pyramid)', '']
    rows = []
    for v in table2:
      paper = PAPER['baseline'] if v == 'baseline' else PAPER[v]
      label = TABLE2_BASELINE_ROW if v == 'baseline' else paper[1]
      rows.append(_row(f'{label} (`{v}`)', paper, grouped[v]))
    lines += [*_table(rows, 'Loss weight'), '']
  found = claims(grouped)
  if found:
    lines += [
      "### The paper's orderings",
      '',
      'Differences in mIoU points between two variants trained with the same seed (same '
      'initial weights, data order and augmentation), mean over seeds (min to max). '
      '"Reproduced" means the paper\'s order holds for every seed.',
      '',
      "| The paper's claim | Paper: mIoU | Ours: mIoU | Ours: car/boat/cow/seal IoU | Verdict |",
      '|---|---:|---:|---:|---|',
    ]
    for c in found:
      lines.append(
        f'| {c["text"]}: `{c["better"]}` > `{c["worse"]}` | {c["paper"]:+.2f} | '
        f'{_signed(c["diffs"])} | {_signed(c["context"])} | {c["verdict"]} |'
      )
    held = sum(all(d > 0 for d in c['diffs']) for c in found)
    lines += ['', f'{held} of {len(found)} orderings hold in every seed.', '']
  lines += ['![mIoU and context-class IoU of every variant](ablation.png)', '', PAPER_SOURCE, '']
  lines += [
    '<details><summary>Every run</summary>',
    '',
    '| Variant | Seed | mIoU | pixel acc. | car/boat/cow/seal IoU | in-training val mIoU '
    '(no flip) | train + eval time |',
    '|---|---:|---:|---:|---:|---:|---:|',
  ]
  for v, runs in grouped.items():
    for s in sorted(runs):
      r = runs[s]
      val = r['val_in_training'].get('mIoU', math.nan)
      lines.append(
        f'| `{v}` | {s} | {100 * r["mIoU"]:.2f} | {100 * r["allAcc"]:.2f} | '
        f'{100 * context_iou(r):.2f} | {100 * val:.2f} | '
        f'{r["train_seconds"]:.0f} + {r["eval_seconds"]:.0f} s |'
      )
  lines += ['', '</details>', '']
  return '\n'.join(lines)


def chart(results: list[dict[str, Any]], path: str | os.PathLike) -> None:
  """Left: our mIoU and context-class IoU per variant, with every seed and its range.
  Right (when the baseline ran): mIoU gain over the baseline, ours (paired by seed) and the
  paper's."""
  import matplotlib  # noqa: PLC0415

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # noqa: PLC0415

  grouped = by_variant(results)
  names = list(grouped)
  has_base = 'baseline' in grouped and len(names) > 1
  fig, axes = plt.subplots(
    1, 2 if has_base else 1, figsize=(13 if has_base else 7, 4.8), squeeze=False
  )
  ax = axes[0][0]
  width = 0.38
  for k, (label, key, colour) in enumerate(
    (('mIoU', lambda r: r['mIoU'], '#4878a8'), ('car/boat/cow/seal IoU', context_iou, '#e0803a'))
  ):
    for i, v in enumerate(names):
      values = [100 * key(r) for r in grouped[v].values()]
      x = i + (k - 0.5) * width
      mean = statistics.fmean(values)
      ax.bar(x, mean, width, color=colour, label=label if i == 0 else None)
      ax.errorbar(
        x, mean, yerr=[[mean - min(values)], [max(values) - mean]], color='black', capsize=3, lw=1
      )
      ax.scatter([x] * len(values), values, s=9, color='black', zorder=3)
  low = min(100 * min(r['mIoU'], context_iou(r)) for r in results)
  ax.set_ylim(max(0.0, low - 5), 104)
  ax.set_xticks(range(len(names)), names, rotation=35, ha='right')
  ax.set_ylabel('%  (bar: mean, whisker: min-max, dots: seeds)')
  ax.set_title('Ours: synthetic scenes, validation')
  ax.legend(loc='upper left', ncol=2, fontsize=8)
  if has_base:
    ax = axes[0][1]
    others = [v for v in names if v != 'baseline']
    for i, v in enumerate(others):
      diffs = [100 * d for d in paired(grouped, v, 'baseline')]
      if diffs:
        mean = statistics.fmean(diffs)
        ax.bar(i - width / 2, mean, width, color='#4878a8', label='ours' if i == 0 else None)
        ax.errorbar(
          i - width / 2,
          mean,
          yerr=[[mean - min(diffs)], [max(diffs) - mean]],
          color='black',
          capsize=3,
          lw=1,
        )
      ax.bar(
        i + width / 2,
        PAPER[v][2] - PAPER['baseline'][2],
        width,
        color='#b0b0b0',
        label='paper (ADE20K)' if i == 0 else None,
      )
    ax.axhline(0, color='black', lw=0.8)
    ax.set_xticks(range(len(others)), others, rotation=35, ha='right')
    ax.set_ylabel("mIoU minus the baseline's, points")
    ax.set_title('Gain over the dilated FCN baseline (same seed)')
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def write(
  results: list[dict[str, Any]], env: dict[str, Any], out_dir: str | os.PathLike
) -> tuple[pathlib.Path, pathlib.Path]:
  """Writes out_dir/ablation.md (keeping an existing file's text above RESULTS_MARKER) and
  out_dir/ablation.png.

  Returns:
    The two paths.
  """
  out = pathlib.Path(out_dir)
  out.mkdir(parents=True, exist_ok=True)
  md_path, png_path = out / 'ablation.md', out / 'ablation.png'
  header = DEFAULT_HEADER
  if md_path.is_file():
    header = md_path.read_text().split(RESULTS_MARKER)[0]
  chart(results, png_path)
  md_path.write_text(header.rstrip('\n') + '\n\n' + markdown(results, env))
  return md_path, png_path
