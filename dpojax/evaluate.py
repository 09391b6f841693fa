"""The implicit-reward win rate (accuracy), loss and reward margins of a checkpoint on a JSONL.

  python -m dpojax.evaluate --checkpoint WORKDIR --data pairs.jsonl [--output metrics.json]

WORKDIR is a dpojax workdir (its latest checkpoint) or one of its checkpoints/<step> or
best/<step> folders. The reference is the one the run trained against (init.path, or the
random init from train.seed), or --reference PATH (a .nemo, Hugging Face folder or workdir).
The file is read with the run's data settings (format, template, max_seq_length, truncation)
and evaluated with the run's loss (dpo.*) by the same jitted eval step and metric reduction
as validation during training, so the numbers are comparable with metrics.jsonl's `val` rows.
"""

from __future__ import annotations

from dpojax import hostmem

hostmem.retain_freed_memory()  # Before any import starts threads.

# pylint: disable=wrong-import-position
import argparse
import functools
import json
import os
import sys
import tempfile

import jax
import ml_collections
import numpy as np

from dpojax import cli
from dpojax import model as model_lib
from dpojax import pretrained
from dpojax import workdir as workdir_lib
from dpojax.data import batching
from dpojax.train import build as build_lib
from dpojax.train import compiled
from dpojax.train import metrics as metrics_lib
from dpojax.train import reference as reference_lib
from dpojax.train import sharding

# Printed first, in this order; every other metric follows.
HEADLINE = ("accuracy", "loss", "rewards_margin_mean", "rewards_chosen_mean",
            "rewards_rejected_mean", "logps_chosen_mean", "logps_rejected_mean", "num_pairs",
            "nll_loss", "log_odds_ratio", "log_odds_chosen", "kl")  # CPO/ORPO/KTO's.


def evaluate(config, policy_params, ref_params, data_path: str, *, batch_size: int | None = None,
             max_seq_length: int | None = None, max_batches: int = -1) -> dict:
  """Metric means over every usable pair of `data_path` (as validation in training gives
  them), plus `dropped` (pairs over data.max_seq_length) and `skipped` (bad records,
  data.on_error=skip).

  `config` is the run config (workdir.read_config); params are host or device trees.
  """
  config = ml_collections.ConfigDict(config.to_dict())  # A private, unlocked copy.
  if max_seq_length:
    config.data.max_seq_length = max_seq_length
  batch_size = batch_size or config.train.micro_batch_size
  # The config is resolved (pretrained.load_policy): init.path need not be loaded again.
  data, step_cfg = build_lib.build_eval(config, data_path)
  model_cfg = step_cfg.model
  batches = batching.eval_batches(data, global_batch_size=batch_size,
                                  micro_batch_size=batch_size, max_batches=max_batches)
  mesh = _mesh(config.mesh)
  abstract_params = jax.eval_shape(functools.partial(model_lib.init_params, model_cfg),
                                   jax.random.key(0))
  # SimPO/CPO/ORPO (reference mode none): no reference weights in the step at all.
  no_reference = reference_lib.resolve(step_cfg).logps == "zero"
  if no_reference:
    ref_params = {}
  eval_fn, params_sh, ref_sh = compiled.compile_eval_step(
      step_cfg, abstract_params, {} if no_reference else abstract_params, mesh, batches[0])
  dtype = np.dtype(jax.numpy.dtype(model_cfg.param_dtype))
  place = lambda tree, sh: jax.device_put(
      jax.tree.map(lambda x: np.asarray(x, dtype), tree), sh)
  metrics = metrics_lib.evaluate(eval_fn, place(policy_params, params_sh),
                                 place(ref_params, ref_sh), batches, mesh)
  metrics = {k: float(v) for k, v in metrics.items()}
  metrics["dropped"] = data.stats.get("dropped", 0)
  metrics["skipped"] = data.stats.get("skipped", 0)
  return metrics


def _mesh(mesh_cfg):
  try:
    return sharding.make_mesh(mesh_cfg)
  except ValueError:  # The training mesh does not fit these devices: plain data parallel.
    return sharding.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def format_metrics(metrics: dict) -> str:
  keys = [k for k in HEADLINE if k in metrics] + sorted(k for k in metrics if k not in HEADLINE)
  width = max(len(k) for k in keys)
  return "\n".join(f"{k:<{width}}  {metrics[k]:.6g}" for k in keys)


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  parser = argparse.ArgumentParser(prog="python -m dpojax.evaluate",
                                   description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--checkpoint", required=True,
                      help="dpojax workdir, or its checkpoints/<step> or best/<step> folder")
  parser.add_argument("--data", required=True, help="preference pairs: JSONL[.gz] or packed dir")
  parser.add_argument("--reference", default=None,
                      help="reference checkpoint (default: the run's init.path or random init)")
  parser.add_argument("--batch_size", type=int, default=None,
                      help="pairs per evaluation batch (default: the run's micro_batch_size)")
  parser.add_argument("--max_seq_length", type=int, default=None,
                      help="override data.max_seq_length (longer pairs are dropped/truncated)")
  parser.add_argument("--max_batches", type=int, default=-1, help="-1 = the whole file")
  parser.add_argument("--output", default=None, help="also write the metrics as JSON here")
  parser.add_argument("--config", default=None,
                      help="run config (.json or .py) for a workdir without run_config.json")
  cli.add_debug_flag(parser)
  args = parser.parse_args(argv)
  if args.batch_size is not None and args.batch_size < 1:
    raise ValueError(f"--batch_size={args.batch_size} must be >= 1")
  with tempfile.TemporaryDirectory(prefix="dpojax-evaluate-") as tmp:
    policy = pretrained.load_policy(args.checkpoint, config_path=args.config,
                                    extract_dir=os.path.join(tmp, "policy"))
    if policy.run_config is None:
      raise workdir_lib.WorkdirError(
          f"--checkpoint={args.checkpoint}: expected a dpojax workdir (a .nemo or Hugging "
          "Face checkpoint records no run config); evaluate its run's workdir instead")
    if args.reference:
      ref_params = pretrained.load_policy(
          args.reference, extract_dir=os.path.join(tmp, "reference")).params
    else:
      ref_params = pretrained.load_reference(policy, extract_dir=os.path.join(tmp, "ref"))
    metrics = evaluate(policy.run_config, policy.params, ref_params, args.data,
                       batch_size=args.batch_size, max_seq_length=args.max_seq_length,
                       max_batches=args.max_batches)
  print(f"{args.checkpoint} on {args.data}:")
  print(format_metrics(metrics))
  if args.output:
    with open(args.output, "w") as f:
      json.dump({"checkpoint": os.path.abspath(args.checkpoint),
                 "data": os.path.abspath(args.data), **metrics}, f, indent=1)
  return 0


if __name__ == "__main__":
  sys.exit(main())
