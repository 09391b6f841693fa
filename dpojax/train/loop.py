"""The training loop: the one place that does I/O (data, logging, evaluation, checkpoints).

Everything before the first step comes from its own module: checks, build (tokenizer, model,
data, step config), pretrained (init.path, export.to), compiled (the jitted steps), and the
checkpoint policy of checkpoint.orbax.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dpojax import config as config_lib
from dpojax import hostmem
from dpojax import loss as loss_lib
from dpojax import model as model_lib
from dpojax import pretrained as pretrained_lib
from dpojax import workdir as workdir_lib
from dpojax.model import moe as moe_lib
from dpojax.checkpoint import orbax as orbax_ckpt
from dpojax.checkpoint.orbax import Checkpointer
from dpojax.data import batching, pipeline, tokenize
from dpojax.train import build as build_lib
from dpojax.train import compiled
from dpojax.train import metrics as metrics_lib
from dpojax.train import precompute
from dpojax.train import reference
from dpojax.train import sharding
from dpojax.train import step as step_lib
from dpojax.tracking import samples as samples_lib
from dpojax.tracking import timing
from dpojax.tracking import writers as writers_lib


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps."""


class StopRequested:
  """SIGTERM/SIGINT: finish the current step, checkpoint, and leave cleanly.

  Entered again while active (main enters it before its imports), it keeps the outer one."""

  def __init__(self):
    self.signal = None
    self._previous = {}
    self._depth = 0

  def __enter__(self):
    if not self._depth:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    self._depth += 1
    return self

  def _handle(self, signum, frame):
    del frame
    self.signal = signum

  def __exit__(self, *exc):
    self._depth -= 1
    if not self._depth:
      for sig, handler in self._previous.items():
        signal.signal(sig, handler)


def _latest_on_disk(workdir: str) -> int | None:
  """The latest complete step under <workdir>/checkpoints (Orbax renames a step folder to its
  number once complete), without starting a manager."""
  try:
    steps = [int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()]
  except OSError:
    return None
  return max(steps, default=None)


def _before_first_step(signum, latest, directory) -> str:
  saved = ("nothing was saved yet" if latest is None else
           f"nothing new was saved; the latest checkpoint is still step {latest} in {directory}"
           if latest else f"the latest checkpoint is step 0 (the initial state) in {directory}")
  return (f"Received signal {signum} before the first step: {saved}; run again with the same "
          "--workdir to start or resume.")


def _stopped_before_training(stop, workdir: str) -> dict:
  latest = _latest_on_disk(workdir)
  if jax.process_index() == 0:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    print(_before_first_step(stop.signal, latest, directory), flush=True)
  return {"state": None, "val": None, "step": latest or 0}


class _Abandoned(Exception):
  """A stop signal arrived while a start-up stage (compilation, the step-0 validation, the
  reference tables) was still running: the stage is left to its thread and the run ends."""


def _interruptible(stop: StopRequested, fn, *args):
  """fn(*args) on a worker thread while this one polls for a stop signal: XLA compiles and
  runs without returning to Python, and on a real model compiling the step and validating at
  step 0 take minutes, longer than a preemption's grace period. Raises _Abandoned when a
  signal comes first (the worker, a daemon, is left to finish or die with the process)."""
  if stop.signal is not None:
    raise _Abandoned
  box = {}

  def work():
    try:
      box["out"] = fn(*args)
    except BaseException as e:  # pylint: disable=broad-exception-caught (re-raised below)
      box["err"] = e

  worker = threading.Thread(target=work, name="dpojax-start-up", daemon=True)
  worker.start()
  while worker.is_alive():
    worker.join(0.05)
    if stop.signal is not None and worker.is_alive():
      raise _Abandoned
  if "err" in box:
    raise box["err"]
  return box["out"]


def run(config, workdir: str, stop: StopRequested | None = None) -> dict:
  """Trains to `train.max_steps` (resuming from `workdir` if it has a checkpoint).

  SIGTERM/SIGINT at any moment (from `stop`'s entry, when given) ends the run cleanly: during
  start-up before the next stage, during training after the current step and its checkpoint.
  """
  with stop or StopRequested() as stop:
    try:
      return _run(config, workdir, stop)
    except _Abandoned:  # Nothing of this start was saved (no step had finished).
      return dict(_stopped_before_training(stop, workdir), abandoned=True)


def _run(config, workdir: str, stop: StopRequested) -> dict:
  # Before init.path is read: bad values stop before anything heavy.
  config_lib.check_config(config)
  writers_lib.check_available(config)  # A tracker's missing package, before anything heavy.
  config_lib.check_workdir(workdir)
  if stop.signal is not None:
    return _stopped_before_training(stop, workdir)
  pretrained = pretrained_lib.load_pretrained(config, workdir)
  if stop.signal is not None:
    return _stopped_before_training(stop, workdir)
  tok, train_data, val_data, step_cfg = build_lib.build(config, pretrained)
  if stop.signal is not None:
    return _stopped_before_training(stop, workdir)
  lead = jax.process_index() == 0
  say = functools.partial(print, flush=True) if lead else lambda *a, **k: None
  # Every write of the run (metrics, events, trackers, curves, run config) fails one way.
  writers = writers_lib.Writers(on_error=config.checkpoint.on_error, say=say,
                                checkpoints=os.path.join(os.path.abspath(workdir), "checkpoints"))
  run_config_path = os.path.join(workdir, workdir_lib.RUN_CONFIG)
  if lead:  # What generate/evaluate need to rebuild the run.
    writers.attempt(_latest_on_disk(workdir) or 0, workdir_lib.RUN_CONFIG, run_config_path,
                    lambda: workdir_lib.write_config(workdir, config, step_cfg.model, tok.path,
                                                     template=train_data.opts.template))
    for warning in (pipeline.toy_val_warning(config.data.train_path, config.data.val_path),
                    tokenize.resolve_template(config.data.template, tok)[1]):
      if warning:
        print(warning, flush=True)
  t = config.train
  mesh = sharding.make_mesh(config.mesh)
  if sharding.context_size(mesh) > 1 and step_cfg.model.attention_sinks:
    raise config_lib.ConfigError("mesh.context > 1: the context-parallel attention has no "
                                 "attention sinks (gpt-oss); use mesh.context=1")
  step_cfg = dataclasses.replace(step_cfg, mesh=mesh)  # Vocab-parallel log-probs, flash shards.
  tx, schedule = step_lib.make_optimizer(t)
  key = jax.random.key(t.seed)
  abstract_params = jax.eval_shape(functools.partial(model_lib.init_params, step_cfg.model), key)
  hostmem.fit_to_model(sum(x.size for x in jax.tree.leaves(abstract_params)))
  ref_cfg = config_lib.ReferenceConfig.from_config(config)
  sync, precomputed = ref_cfg.sync_steps > 0, reference.resolve(step_cfg).logps == "batch"
  abstract = reference.abstract_split(step_cfg, abstract_params, sync=sync)
  abstract_state = jax.eval_shape(lambda p, r: step_lib.init_state(p, tx, ref=r),
                                  abstract.trainable, abstract.state_ref)
  train_iter = iter(batching.train_dataset(
      train_data, global_batch_size=t.global_batch_size,
      micro_batch_size=t.micro_batch_size, seed=t.seed))
  val_batches = batching.eval_batches(
      val_data, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
      max_batches=config.eval.max_batches)
  example = val_batches[0]
  if precomputed:  # Shapes only: the tables come once the weights exist.
    example = precompute.add_ref_logps(example, np.zeros((len(val_data), 2), np.float32))
  train_fn, eval_fn, state_sh, ref_sh = compiled.compile_steps(
      step_cfg, tx, schedule, abstract_state, abstract.frozen, mesh, example,
      inject_nonfinite_at=config.debug.inject_nonfinite_at)
  # Everything is created on the mesh, never gathered on one device.
  params_sh = sharding.tree_shardings(abstract_params, mesh)
  if pretrained is None:
    params = jax.jit(model_lib.init_params, static_argnums=0, out_shardings=params_sh)(
        step_cfg.model, key)
  else:
    dtype = jnp.dtype(step_cfg.model.param_dtype)
    params = jax.device_put(jax.tree.map(lambda x: np.asarray(x, dtype), pretrained.params),
                            params_sh)
  tables = None
  if precomputed:  # One forward pass over both splits (or the disk cache), before training.
    tables = _interruptible(stop, functools.partial(
        precompute.precompute_tables, step_cfg, ref_cfg, params,
        {"train": train_data, "val": val_data}, pairs_per_batch=t.global_batch_size,
        micro_batch_size=t.micro_batch_size, mesh=mesh))
    val_batches = [precompute.add_ref_logps(b, tables["val"]) for b in val_batches]
  # copy: the reference is the initial policy in its own buffers (the state is donated);
  # LoRA: the frozen tree holds `params` itself as the base.
  parts = reference.split(step_cfg, params, sync=sync, mesh=mesh)
  ref_params = parts.frozen
  state = jax.jit(lambda p, r: step_lib.init_state(p, tx, ref=r), out_shardings=state_sh)(
      parts.trainable, parts.state_ref)
  del params, parts
  if stop.signal is not None:  # Before the restore: no manager to close yet.
    return _stopped_before_training(stop, workdir)
  sync_fn = jax.jit(functools.partial(reference.sync_state, cfg=step_cfg,
                                      alpha=ref_cfg.sync_alpha),
                    in_shardings=(state_sh, ref_sh), out_shardings=state_sh, donate_argnums=0)

  ckpt = Checkpointer(workdir, max_to_keep=config.checkpoint.max_to_keep,
                      async_save=config.checkpoint.async_save,
                      keep_best=config.checkpoint.keep_best)
  start = ckpt.latest_step() or 0
  consumed = 0
  if start:
    state, data_state = ckpt.restore(start, state)
    train_iter.set_state(data_state["iterator"])
    consumed = data_state["consumed_samples"]
    if jax.process_index() == 0:
      print(f"Resumed from {ckpt.directory} at step {start}", flush=True)
  # Records past the checkpoint we start from are redone; with no checkpoint, all of them.
  writers_lib.open_writers(writers, config, workdir, resume_step=start if start else -1,
                           lead=lead, run_config_path=run_config_path)
  sampler = samples_lib.Sampler(config.eval, val_data, tok, step_cfg)
  n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
  sized = ("" if pretrained is not None or step_cfg.model.vocab_size == config.model.vocab_size
           else f" (model.vocab_size {config.model.vocab_size} -> {step_cfg.model.vocab_size}: "
           "the tokenizer's)")
  say(f"Training on {batching.describe_epochs(train_data, t.global_batch_size, t.seed, t.max_steps)}"
      f" ({len(val_data)} val pairs), {tokenize.describe_template(train_data.opts.template, tok)}, "
      f"{n_params:,} parameters{sized} "
        f"({sum(x.size for x in jax.tree.leaves(abstract.trainable)):,} trained), mesh "
        f"{dict(mesh.shape)}, {jax.process_count()} process(es), attention "
        f"{model_lib.attention_path(step_cfg.model, mesh)}, batches "
        f"{batching.describe_layout(train_data, t.global_batch_size, t.micro_batch_size)}")

  def data_state():
    return {"iterator": train_iter.get_state(), "consumed_samples": consumed}

  peak = timing.mfu_peak(t.peak_flops, step_cfg.model.dtype, say)
  timer = timing.PhaseTimer()
  # MoE models: the parameters a token uses (model/moe.py's active_params).
  throughput = metrics_lib.Throughput(metrics_lib.flops_per_token(
      moe_lib.active_params(step_cfg.model, n_params), reference=step_cfg.reference,
      lora=step_cfg.lora is not None), peak)
  bar = metrics_lib.progress_bar(t.max_steps, start, lead)

  def first_call(fn, *args):
    """The first eval or train call of this start compiles: a stop signal ends the run
    there, after the checkpoints already written are complete."""
    try:
      return _interruptible(stop, fn, *args)
    except _Abandoned:
      bar.close()
      orbax_ckpt.close_checkpoints(ckpt, config, say)
      writers.close(start)
      raise

  def validate(step):
    evaluate = functools.partial(metrics_lib.evaluate, eval_fn, state if sync else state.params,
                                 ref_params, val_batches, mesh)
    with timer.phase("eval"):  # The first evaluation compiles: a stop signal may end it.
      metrics = first_call(evaluate) if step == start else evaluate()
    metrics.update(eval_time=timer.take("eval")["eval"])
    if sampler.enabled:
      with timer.phase("samples"):
        samples = sampler(step, state.params, ref_params, state.ref if sync else None)
      metrics.update(sample_time=timer.take("samples")["samples"])
      writers.write_samples(step, samples)
    writers.write(step, "val", metrics)
    save(step, best_loss=metrics["loss"])
    return metrics

  def save(step, best_loss=None):
    with timer.phase("checkpoint"):
      writers.flush(step)  # What the checkpoint's step has logged is durable first.
      orbax_ckpt.save_checkpoint(ckpt, step, state, data_state(), config, say,
                                 best_loss=best_loss)

  eval_interval = config.eval.interval
  if config.eval.get("interval_epochs", 0.0) > 0:  # A fraction of an epoch, in whole steps.
    epoch_steps = batching.steps_per_epoch(train_data, t.global_batch_size, t.seed)
    eval_interval = max(1, round(config.eval.interval_epochs * epoch_steps))
    say(f"Validating every {eval_interval} steps ({config.eval.interval_epochs} of an epoch "
        f"of {epoch_steps:.1f} steps)")
  last_val = None
  if start == 0 and config.eval.at_start and stop.signal is None:
    last_val = validate(0)
  tick_step = start
  step, nonfinite_total, nonfinite_run = start, 0, 0
  timer.take("data", "compute", "checkpoint")  # Start-up is no step's time.
  while step < t.max_steps and stop.signal is None:
    with timer.phase("data"):
      host_batch = next(train_iter)
      if precomputed:
        host_batch = precompute.add_ref_logps(host_batch, tables["train"])
      batch = sharding.global_batch(host_batch, mesh)
    with timer.phase("compute"):
      if step == start:  # Compiles: a stop signal ends the run with nothing new to save.
        state, metrics = first_call(train_fn, state, ref_params, batch)
      else:
        state, metrics = train_fn(state, ref_params, batch)
      step += 1
      if sync and step % ref_cfg.sync_steps == 0:  # TR-DPO, after the optimizer step.
        state = sync_fn(state, ref_params)
      # Two scalars per step: the guard must know now, and packed steps vary in pairs.
      nonfinite, pairs = jax.device_get((metrics["nonfinite"], metrics["num_pairs"]))
    local_tokens = int(np.sum(np.asarray(host_batch["segment_ids"]) > 0))
    throughput.add(int(pairs), local_tokens * jax.process_count())
    consumed += int(pairs)
    bar.update(1)
    if float(nonfinite):  # One scalar per step: the guard needs to know now.
      nonfinite_total, nonfinite_run = nonfinite_total + 1, nonfinite_run + 1
      say(f"Step {step}: non-finite loss or gradient; update skipped "
          f"(pairs: {metrics_lib.describe_pairs(host_batch, train_data)})")
      if nonfinite_run >= t.max_consecutive_nonfinite:
        orbax_ckpt.close_checkpoints(ckpt, config, say)
        raise NonFiniteError(
            f"{nonfinite_run} consecutive non-finite steps (train.max_consecutive_nonfinite="
            f"{t.max_consecutive_nonfinite}) at step {step}; stopping. The last good "
            f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}.")
    else:
      nonfinite_run = 0
    if step % t.log_interval == 0 or step == t.max_steps:
      metrics = loss_lib.finalize_metrics(jax.device_get(metrics))
      times = timer.train_record(step - tick_step)
      metrics["step_time"] = times.pop("step_time")
      metrics["consumed_samples"] = consumed
      metrics["epoch"] = consumed / len(train_data)  # Pairs seen / pairs in the file.
      metrics["nonfinite_steps"] = nonfinite_total
      metrics.update(throughput.report(metrics["step_time"] * (step - tick_step)))
      metrics.update(times, **timing.memory_metrics())
      tick_step = step
      writers.write(step, "train", metrics)
    if step % eval_interval == 0 or step == t.max_steps:
      last_val = validate(step)
    if (step % config.checkpoint.interval == 0 or step == t.max_steps
        or stop.signal is not None):
      save(step)
  bar.close()
  orbax_ckpt.close_checkpoints(ckpt, config, say)
  if stop.signal is not None:
    latest = ckpt.latest_step()
    if step == start:
      say(_before_first_step(stop.signal, latest, ckpt.directory))
    elif latest == step:
      say(f"Received signal {stop.signal}: saved step {step} to {ckpt.directory}; "
          "run again with the same --workdir to resume.")
    else:
      say(f"Received signal {stop.signal} at step {step}: its checkpoint was not written; the "
          f"latest is step {latest} in {ckpt.directory}; run again with the same --workdir to "
          "resume from it.")
  if lead and not (stop.signal is not None and step == start):  # Stopped: nothing new.
    writers_lib.finish_run(writers, workdir, step, run_config_path)  # curves.png, trackers.
  writers.close(step)
  if config.export.to and stop.signal is None:
    policy = state.params
    if step_cfg.lora is not None:  # Adapters folded into the base.
      policy = jax.jit(functools.partial(reference.policy_params, step_cfg))(
          state.params, ref_params)
    host_params = multihost_utils.process_allgather(policy, tiled=True)
    if lead:
      pretrained_lib.export(config, step_cfg.model, host_params, tok.path,
                            workdir_lib.init_path(config))
      say(f"Exported the policy to {config.export.to}")
  return {"state": state, "val": last_val, "step": step}
