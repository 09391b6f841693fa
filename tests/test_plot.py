"""PNG training curves: the file exists, has the expected size, and shows the curves."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from dpojax import plot

from conftest import ROOT

METRICS = ("loss", "accuracy", "rewards_chosen_mean", "rewards_rejected_mean",
           "rewards_margin_mean", "logps_chosen_mean", "logps_rejected_mean")


def write_metrics(workdir, train_steps=60, val_every=10):
  """Records shaped like MetricWriter's: train every step, val every `val_every` steps."""
  rng = np.random.default_rng(0)
  with open(os.path.join(workdir, "metrics.jsonl"), "w") as f:
    for step in range(train_steps + 1):
      for split in (("train",) if step else ()) + (("val",) if step % val_every == 0 else ()):
        margin = 2 * (1 - np.exp(-step / 20)) + (0.2 * rng.normal() if split == "train" else 0)
        r = {"step": step, "split": split, "loss": float(np.log1p(np.exp(-margin))),
             "accuracy": float(1 / (1 + np.exp(-3 * margin))),
             "rewards_chosen_mean": 0.3 * margin, "rewards_rejected_mean": -0.7 * margin,
             "rewards_margin_mean": margin, "logps_chosen_mean": -60 + margin,
             "logps_rejected_mean": -50 - 2 * margin, "num_pairs": 8.0}
        f.write(json.dumps(r) + "\n")


def colour_pixels(rgb, hex_colour, tol=40):
  want = np.asarray([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
  return int(np.sum(np.abs(rgb.astype(int) - want).max(-1) < tol))


def test_plot_metrics_draws_every_curve(tmp_path):
  write_metrics(tmp_path)
  path = plot.plot_metrics(str(tmp_path))
  assert path == os.path.join(str(tmp_path), "curves.png")
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".tmp.png")]
  image = Image.open(path)
  assert image.format == "PNG"
  assert image.size == (1500, 800)  # FIGSIZE * DPI.
  rgb = np.asarray(image.convert("RGB"))
  assert np.mean(rgb.min(-1) < 250) > 0.05  # Far from a blank page.
  assert len(np.unique(rgb.reshape(-1, 3), axis=0)) > 50
  # Both splits' curves are drawn in every one of the six panels (2 x 3 grid).
  for colour in plot.SPLIT_COLORS.values():
    for row in range(2):
      for col in range(3):
        panel = rgb[row * 400:(row + 1) * 400, col * 500:(col + 1) * 500]
        assert colour_pixels(panel, colour) > 200, (colour, row, col)


def test_missing_metrics_leave_panels_out_and_train_only_works(tmp_path):
  with open(tmp_path / "metrics.jsonl", "w") as f:
    for step in (1, 2, 3):
      f.write(json.dumps({"step": step, "split": "train", "loss": 1.0 / step}) + "\n")
  rgb = np.asarray(Image.open(plot.plot_metrics(str(tmp_path))).convert("RGB"))
  assert colour_pixels(rgb[:400, :500], plot.SPLIT_COLORS["train"]) > 100  # The loss panel.
  assert colour_pixels(rgb, plot.SPLIT_COLORS["val"]) == 0
  assert (rgb[460:, :] > 250).all()  # The second row of panels is left out (white).


def test_read_metrics_keeps_the_last_record_of_a_step(tmp_path):
  lines = [{"step": 2, "split": "train", "loss": 5.0}, {"step": 1, "split": "train", "loss": 3.0},
           {"step": 2, "split": "train", "loss": 4.0}, {"step": 0, "split": "val", "loss": 0.7}]
  (tmp_path / "m.jsonl").write_text("".join(json.dumps(l) + "\n" for l in lines) + "\n")
  data = plot.read_metrics(str(tmp_path / "m.jsonl"))
  assert data["train"]["loss"] == ([1, 2], [3.0, 4.0])
  assert data["val"]["loss"] == ([0], [0.7])


def test_cli_and_errors(tmp_path):
  write_metrics(tmp_path, train_steps=5, val_every=5)
  out = tmp_path / "elsewhere.png"
  r = subprocess.run([sys.executable, "-m", "dpojax.plot", str(tmp_path), "--output", str(out)],
                     cwd=ROOT, capture_output=True, text=True, check=False)
  assert r.returncode == 0 and Image.open(out).size == (1500, 800), r.stderr
  assert plot.main([str(tmp_path / "nowhere")]) == 1  # One line: tests/test_cli.py.
  with open(tmp_path / "metrics.jsonl", "a") as f:
    f.write('{"step": 6, "split": "train", "loss": 1.0}\n{"step": 7, "split"\n')
  with pytest.raises(ValueError, match=r"metrics.jsonl:9: not valid JSON"):
    plot.plot_metrics(str(tmp_path))
