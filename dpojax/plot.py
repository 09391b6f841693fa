"""Training curves from `<workdir>/metrics.jsonl` as one PNG: `<workdir>/curves.png`.

  python -m dpojax.plot WORKDIR [--output PATH]

Panels: loss, accuracy (implicit-reward win rate), reward margin, chosen and rejected rewards,
and the policy's chosen/rejected log-probs; each with the train records (a thin line) and
the validation records (dots on a line). Panels of metrics the file lacks are left out.
Drawn with matplotlib's Agg canvas directly (no pyplot), so it needs no display and leaves
the caller's matplotlib backend alone.
"""

from __future__ import annotations

import argparse
import os
import sys

from dpojax import cli
from dpojax.data import sources

CURVES_FILE = "curves.png"
METRICS_FILE = "metrics.jsonl"  # As dpojax.train.metrics writes it.
# (title, [(metric, label suffix)]): one panel each.
PANELS = (
    ("loss", [("loss", "")]),
    ("accuracy (reward win rate)", [("accuracy", "")]),
    ("reward margin (chosen - rejected)", [("rewards_margin_mean", "")]),
    ("chosen reward", [("rewards_chosen_mean", "")]),
    ("rejected reward", [("rewards_rejected_mean", "")]),
    ("policy log-probs", [("logps_chosen_mean", " chosen"), ("logps_rejected_mean", " rejected")]),
    # The methods' own (dpojax.methods): CPO/SimPO/ORPO's NLL term, ORPO's odds, KTO's KL.
    ("NLL of the chosen (CPO, ORPO)", [("nll_loss", "")]),
    ("ORPO log odds", [("log_odds_ratio", " log sigmoid(ratio)"), ("log_odds_chosen", " ratio")]),
    ("KL estimate (KTO)", [("kl", "")]),
)
SPLIT_COLORS = {"train": "#1f77b4", "val": "#d62728"}  # Blue and red; other splits: grey.
FIGSIZE, DPI = (15.0, 8.0), 100  # 1500 x 800 pixels.


def read_metrics(path: str) -> dict[str, dict[str, tuple[list, list]]]:
  """{split: {metric: (steps, values)}}, ordered by step; a step logged twice keeps its last
  record. Errors name the file and line."""
  records: dict[str, dict[int, dict]] = {}
  with open(path) as f:
    for line_no, r in sources.jsonl_records(f, path):
      if not isinstance(r, dict) or not isinstance(r.get("step"), int) or "split" not in r:
        raise ValueError(f"{path}:{line_no}: expected an object with integer 'step' and 'split'")
      records.setdefault(str(r["split"]), {})[r["step"]] = r
  out = {}
  for split, by_step in records.items():
    series: dict[str, tuple[list, list]] = {}
    for step in sorted(by_step):
      for k, v in by_step[step].items():
        if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool):
          steps, values = series.setdefault(k, ([], []))
          steps.append(step)
          values.append(float(v))
    out[split] = series
  return out


def plot_metrics(workdir: str, output: str | None = None) -> str:
  """Draws the curves of `<workdir>/metrics.jsonl` into `output` (default
  `<workdir>/curves.png`, replaced atomically) and returns its path."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # pylint: disable=g-import-not-at-top
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  from matplotlib.ticker import MaxNLocator  # pylint: disable=g-import-not-at-top

  path = os.path.join(workdir, METRICS_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no metrics file (is {workdir} a dpojax workdir?)")
  data = read_metrics(path)
  panels = [(title, lines) for title, lines in PANELS
            if any(m in series for series in data.values() for m, _ in lines)]
  if not panels:
    raise ValueError(f"{path}: none of the metrics to plot "
                     f"({', '.join(m for _, lines in PANELS for m, _ in lines)})")
  rows = max(2, -(-len(panels) // 3))  # 2 x 3, a row more per 3 of the methods' panels.
  fig = Figure(figsize=(FIGSIZE[0], FIGSIZE[1] * rows / 2), dpi=DPI)
  FigureCanvasAgg(fig)
  axes = fig.subplots(rows, 3).ravel()
  for ax, (title, lines) in zip(axes, panels):
    for split, series in sorted(data.items()):
      color = SPLIT_COLORS.get(split, "#7f7f7f")
      for i, (metric, suffix) in enumerate(lines):
        if metric not in series:
          continue
        steps, values = series[metric]
        style = dict(color=color, linestyle="-" if i == 0 else "--", label=split + suffix)
        if split == "train":
          ax.plot(steps, values, linewidth=1.0, alpha=0.9, **style)
        else:
          ax.plot(steps, values, marker="o", markersize=3, linewidth=1.5, **style)
    if title.startswith("accuracy"):
      ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
  for ax in axes[len(panels):]:
    ax.set_visible(False)
  fig.suptitle(os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  output = output or os.path.join(workdir, CURVES_FILE)
  tmp = output + ".tmp.png"
  fig.savefig(tmp, dpi=DPI)
  os.replace(tmp, output)
  return output


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  parser = argparse.ArgumentParser(prog="python -m dpojax.plot",
                                   description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("workdir", help="a dpojax workdir (holds metrics.jsonl)")
  parser.add_argument("--output", default=None, help=f"PNG path (default: WORKDIR/{CURVES_FILE})")
  cli.add_debug_flag(parser)
  args = parser.parse_args(argv)
  out = plot_metrics(args.workdir, args.output)
  print(f"Wrote {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
