"""The training loop: the one place that does I/O (data, logging, evaluation, checkpoints)."""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import tarfile
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from dpojax import loss as loss_lib
from dpojax import model as model_lib
from dpojax import reference
from dpojax import workdir as workdir_lib
from dpojax.checkpoint import orbax as orbax_ckpt
from dpojax.checkpoint.orbax import Checkpointer
from dpojax.data import pipeline
from dpojax.data.tokenize import Tokenizer
from dpojax.ops import logprob as logprob_lib
from dpojax.train import sharding
from dpojax.train import step as step_lib
from dpojax.train import metrics as metrics_lib
from dpojax.train.metrics import MetricWriter
from dpojax.errors import ConfigError


CHECKPOINT_ON_ERROR = ("stop", "continue")


def check_config(config):
  t = config.train
  if t.global_batch_size <= 0 or t.micro_batch_size <= 0:
    raise ConfigError("train.global_batch_size and train.micro_batch_size must be positive")
  if t.global_batch_size % t.micro_batch_size:
    raise ConfigError(f"train.global_batch_size={t.global_batch_size} is not a multiple of "
                      f"train.micro_batch_size={t.micro_batch_size}")
  if t.max_steps <= 0:
    raise ConfigError(f"train.max_steps={t.max_steps} must be positive")
  for key in ("eval.interval", "checkpoint.interval", "train.log_interval"):
    section, name = key.split(".")
    if config[section][name] <= 0:
      raise ConfigError(f"{key}={config[section][name]} must be positive")
  if config.eval.get("interval_epochs", 0.0) < 0:
    raise ConfigError(f"eval.interval_epochs={config.eval.interval_epochs} must be >= 0")
  for key, ok, rule in (
      ("train.learning_rate", lambda v: v > 0, "must be positive"),
      ("train.warmup_steps", lambda v: v >= 0, "must be >= 0"),
      ("train.min_lr_ratio", lambda v: 0 <= v <= 1, "must be in [0, 1]"),
      ("train.weight_decay", lambda v: v >= 0, "must be >= 0"),
      ("train.adam_b1", lambda v: 0 <= v < 1, "must be in [0, 1)"),
      ("train.adam_b2", lambda v: 0 <= v < 1, "must be in [0, 1)"),
      ("train.adam_eps", lambda v: v > 0, "must be positive"),
      ("train.grad_clip", lambda v: v >= 0, "must be >= 0 (0 disables it)"),
      ("train.max_consecutive_nonfinite", lambda v: v >= 1, "must be at least 1"),
      ("checkpoint.max_to_keep", lambda v: v >= 1, "must be at least 1")):
    section, name = key.split(".")
    value = config[section][name]
    if not ok(value):  # NaN fails every rule.
      raise ConfigError(f"{key}={value} {rule}")
  if config.checkpoint.on_error not in CHECKPOINT_ON_ERROR:
    raise ConfigError(f"checkpoint.on_error={config.checkpoint.on_error!r} is not one of "
                      f"{CHECKPOINT_ON_ERROR}")
  model_lib.ModelConfig.from_dict(config.model)  # Names the model.* key (dtypes, shapes).
  loss_lib.LossConfig.from_config(config.dpo)  # Checks every dpo.* key; names the key.
  logprob_lib.resolve_impl(config.logprob.impl)  # Names logprob.impl if it is unknown.


def check_workdir(workdir: str):
  """Fails before any compilation if the workdir cannot be written."""
  try:
    os.makedirs(workdir, exist_ok=True)
    # A probe of this process's own: the processes of a run share the workdir, and one
    # removing a common probe under another's feet would fail that one.
    fd, probe = tempfile.mkstemp(prefix=".write_probe.", dir=workdir)
    os.close(fd)
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"--workdir={workdir} is not writable ({e.strerror})") from None


def _extract_dir(workdir: str) -> str:
  """Where init.path's tokenizer is unpacked: one folder per process (they share the workdir)."""
  index = jax.process_index()
  return os.path.join(workdir, "init_tokenizer" if index == 0 else f"init_tokenizer.{index}")


def load_pretrained(config, workdir: str):
  """`init.path`: a .nemo file, a Hugging Face folder, or a dpojax workdir/checkpoint folder.

  Returns None (random init) or a `convert.Loaded` (ModelConfig, host params, tokenizer).
  """
  path = workdir_lib.init_path(config)  # Or init.from, its old name.
  if not path:
    return None
  if not os.path.exists(path):
    raise ConfigError(f"init.path={path}: no such file or folder")
  from dpojax import convert  # pylint: disable=g-import-not-at-top
  if convert.is_checkpoint(path):
    try:
      loaded = convert.load(path, extract_dir=_extract_dir(workdir))
    except (tarfile.TarError, EOFError) as e:  # A member cut short (the header scan passed).
      raise ConfigError(f"init.path={path}: truncated or corrupt archive ({e})") from None
    arch = {k: getattr(loaded.config, k) for k in convert.ARCHITECTURE_FIELDS}
    model_cfg = dataclasses.replace(model_lib.ModelConfig.from_dict(config.model), **arch)
    return convert.Loaded(model_cfg, loaded.params, loaded.tokenizer_path)
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  if workdir_lib.find_config(path):
    # A dpojax run: its architecture and tokenizer from its run config, as for a .nemo; a
    # LoRA run's policy is its adapters merged into its base.
    policy = workdir_lib.load_policy(path, extract_dir=_extract_dir(workdir))
    arch = {k: getattr(policy.config, k) for k in convert.ARCHITECTURE_FIELDS}
    return convert.Loaded(dataclasses.replace(model_cfg, **arch), policy.params,
                          policy.tokenizer_path)
  try:
    params = orbax_ckpt.load_params(path, functools.partial(model_lib.init_params, model_cfg))
  except FileNotFoundError as e:
    raise ConfigError(str(e)) from None
  return convert.Loaded(model_cfg, params, None)


def build(config, pretrained=None):
  """Everything a run needs before the first step; fails early on bad config or data."""
  check_config(config)
  tokenizer_path = config.data.tokenizer_path
  if pretrained is not None and pretrained.tokenizer_path and config.init.checkpoint_tokenizer:
    tokenizer_path = pretrained.tokenizer_path
  tok = Tokenizer(tokenizer_path)
  model_cfg = (model_lib.ModelConfig.from_dict(config.model) if pretrained is None
               else pretrained.config)
  if model_cfg.vocab_size < tok.vocab_size:
    raise ConfigError(f"model.vocab_size={model_cfg.vocab_size} is smaller than the "
                      f"tokenizer's {tok.vocab_size} ({tok.path})")
  opts = pipeline.DataOptions.from_config(config.data)
  train_data = pipeline.PreferenceData(config.data.train_path, tok, opts)
  val_data = pipeline.PreferenceData(config.data.val_path, tok, opts)
  train_data.require(config.train.global_batch_size, "train.global_batch_size")
  val_data.require(1, "validation pairs")
  step_cfg = step_lib.StepConfig(model=model_cfg,
                                 loss=loss_lib.LossConfig.from_config(config.dpo),
                                 logprob_impl=config.logprob.impl,
                                 logprob_token_block=config.logprob.token_block,
                                 logprob_vocab_block=config.logprob.vocab_block)
  step_cfg = reference.step_config(config, step_cfg)  # lora.* and reference.* (checked).
  return tok, train_data, val_data, step_cfg


def export(config, model_cfg, params, tokenizer_path, init_from):
  """`export.to`: the aligned policy as a .nemo file or a Hugging Face folder."""
  from dpojax import convert  # pylint: disable=g-import-not-at-top
  from dpojax.checkpoint import nemo as nemo_ckpt  # pylint: disable=g-import-not-at-top
  base = None
  if init_from and convert.detect_format(init_from) == "nemo":
    base = nemo_ckpt.read_nemo_config(init_from)
  convert.save(config.export.to, model_cfg, params, tokenizer_path, base_config=base,
               overwrite=True)


def guarded_train_step(state, ref_params, batch, *, inject_nonfinite_at=(), **step_kwargs):
  """train_step that refuses non-finite updates: when the loss or the gradient norm is not
  finite, parameters and optimizer state stay as they were (the step counter still moves, as
  the batch was consumed) and `nonfinite` is 1. `inject_nonfinite_at` (debug) poisons the
  loss at those steps so that this path can be tested."""
  new, metrics = step_lib.train_step(state, ref_params, batch, **step_kwargs)
  loss = metrics["loss"]
  if inject_nonfinite_at:
    hit = jnp.any(state.step + 1 == jnp.asarray(inject_nonfinite_at))
    loss = jnp.where(hit, jnp.nan, loss)
  ok = jnp.isfinite(loss) & jnp.isfinite(metrics["grad_norm"])
  keep = lambda n, o: jnp.where(ok, n, o)
  new = new.replace(params=jax.tree.map(keep, new.params, state.params),
                    opt_state=jax.tree.map(keep, new.opt_state, state.opt_state))
  metrics["loss"] = loss
  metrics["nonfinite"] = 1.0 - ok.astype(jnp.float32)
  return new, metrics


def compile_steps(step_cfg, tx, schedule, state, ref_params, mesh, example_batch,
                  inject_nonfinite_at=()):
  """Jits the train and eval steps once, with explicit shardings; the state is donated.

  `state` and `ref_params` may be abstract (jax.ShapeDtypeStruct trees)."""
  state_sh = sharding.state_shardings(state, mesh)
  ref_sh = sharding.tree_shardings(ref_params, mesh)
  batch_sh = sharding.batch_shardings(example_batch, mesh)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  train = jax.jit(
      functools.partial(guarded_train_step, cfg=step_cfg, tx=tx, schedule=schedule,
                        inject_nonfinite_at=tuple(inject_nonfinite_at)),
      in_shardings=(state_sh, ref_sh, batch_sh), out_shardings=(state_sh, replicated),
      donate_argnums=(0,))
  # TR-DPO keeps the reference in the state: evaluation then takes the whole state.
  eval_sh = state_sh if getattr(state, "ref", None) is not None else state_sh.params
  evaluate = jax.jit(functools.partial(step_lib.eval_step, cfg=step_cfg),
                     in_shardings=(eval_sh, ref_sh, batch_sh), out_shardings=replicated)
  return train, evaluate, state_sh, ref_sh


def evaluate(eval_fn, params, ref_params, batches, mesh) -> dict:
  total = None
  for batch in batches:
    sums = eval_fn(params, ref_params, sharding.global_batch(batch, mesh))
    total = sums if total is None else jax.tree.map(jnp.add, total, sums)
  return loss_lib.finalize_metrics(jax.device_get(total))


class NonFiniteError(RuntimeError):
  """Too many consecutive non-finite steps."""


def describe_pairs(host_batch, data) -> str:
  """Where the real pairs of a batch come from (file and source lines), for the non-finite
  log line."""
  index = np.asarray(host_batch["pair_index"]).reshape(-1)
  mask = np.asarray(host_batch["pair_mask"]).reshape(index.shape) > 0
  lines = sorted(data.line(int(i)) for i in index[mask & (index >= 0)])
  return f"{data.source_path}, lines {','.join(map(str, lines))}" if lines else "none"


def save_checkpoint(ckpt, step, state, data_state, config, say, best_loss=None):
  """Saves step `step` (or, with `best_loss`, keeps it under best/ if it is the best so far).

  A write the storage refuses leaves the previous checkpoints restorable (Orbax writes to a
  temporary folder and renames when complete); training stops or continues by
  checkpoint.on_error. An async save's failure surfaces here at the next save, under its step.
  """
  try:
    if best_loss is not None:
      ckpt.save_if_best(step, state, data_state, best_loss)
      return
    ckpt.save(step, state, data_state)
    if not config.checkpoint.async_save:
      ckpt.wait()
  except orbax_ckpt.WriteFailed as e:
    write_failed(ckpt, e, config, say)
    if best_loss is None and e.step != step:  # An earlier async save failed; try this one.
      save_checkpoint(ckpt, step, state, data_state, config, say)


def close_checkpoints(ckpt, config, say):
  """Waits for the last (async) save; its failure is handled as any other."""
  try:
    ckpt.close()
  except orbax_ckpt.WriteFailed as e:
    write_failed(ckpt, e, config, say)


def write_failed(ckpt, error, config, say):
  what = "best checkpoint" if error.directory == ckpt.best_directory else "checkpoint"
  latest = ckpt.latest_step()
  last = (f"the last complete checkpoint is step {latest} in {ckpt.directory}"
          if latest is not None else "no checkpoint has been written yet")
  message = (f"{what} of step {error.step} could not be written to {error.directory} "
             f"({error.reason}); {last}")
  if config.checkpoint.on_error == "continue":
    say(f"WARNING: {message}; continuing (checkpoint.on_error=continue)")
    return
  raise CheckpointWriteError(message + "; stopping (checkpoint.on_error=stop)") from error


class CheckpointWriteError(RuntimeError):
  """A checkpoint could not be written."""


def matmul_peak_flops(n: int | None = None, repeats: int = 3, dtype: str = "float32") -> float:
  """Best FLOP/s of an n^3 product in `dtype` on the first device (the MFU denominator).

  n: None = 8192 on GPU (smaller products do not fill it), 2048 elsewhere. Random operands: a
  product of constants can run faster than real data on GPUs."""
  if n is None:
    n = 8192 if jax.default_backend() == "gpu" else 2048
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.dtype(dtype))
  f = jax.jit(jnp.matmul)
  f(a, a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    f(a, a).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best


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
           f"nothing new was saved; the latest checkpoint is still step {latest} in {directory}")
  return (f"Received signal {signum} before the first step: {saved}; run again with the same "
          "--workdir to start or resume.")


def _stopped_before_training(stop, workdir: str) -> dict:
  latest = _latest_on_disk(workdir)
  if jax.process_index() == 0:
    directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    print(_before_first_step(stop.signal, latest, directory), flush=True)
  return {"state": None, "val": None, "step": latest or 0}


def run(config, workdir: str, stop: StopRequested | None = None) -> dict:
  """Trains to `train.max_steps` (resuming from `workdir` if it has a checkpoint).

  SIGTERM/SIGINT at any moment (from `stop`'s entry, when given) ends the run cleanly: during
  start-up before the next stage, during training after the current step and its checkpoint.
  """
  with stop or StopRequested() as stop:
    return _run(config, workdir, stop)


def _run(config, workdir: str, stop: StopRequested) -> dict:
  check_config(config)  # Before init.path is read: bad values stop before anything heavy.
  check_workdir(workdir)
  if stop.signal is not None:
    return _stopped_before_training(stop, workdir)
  pretrained = load_pretrained(config, workdir)
  if stop.signal is not None:
    return _stopped_before_training(stop, workdir)
  tok, train_data, val_data, step_cfg = build(config, pretrained)
  if stop.signal is not None:
    return _stopped_before_training(stop, workdir)
  if jax.process_index() == 0:  # What generate/evaluate need to rebuild the run.
    workdir_lib.write_config(workdir, config, step_cfg.model, tok.path)
    if warning := pipeline.toy_val_warning(config.data.train_path, config.data.val_path):
      print(warning, flush=True)
  t = config.train
  mesh = sharding.make_mesh(config.mesh)
  step_cfg = dataclasses.replace(step_cfg, mesh=mesh)  # Vocab-parallel log-probs, flash shards.
  tx, schedule = step_lib.make_optimizer(t)
  key = jax.random.key(t.seed)
  abstract_params = jax.eval_shape(functools.partial(model_lib.init_params, step_cfg.model), key)
  ref_cfg = reference.ReferenceConfig.from_config(config)
  sync, precomputed = ref_cfg.sync_steps > 0, step_cfg.reference == "precomputed"
  abstract = reference.abstract_split(step_cfg, abstract_params, sync=sync)
  abstract_state = jax.eval_shape(lambda p, r: step_lib.init_state(p, tx, ref=r),
                                  abstract.trainable, abstract.state_ref)
  train_iter = iter(pipeline.train_dataset(
      train_data, global_batch_size=t.global_batch_size,
      micro_batch_size=t.micro_batch_size, seed=t.seed))
  val_batches = pipeline.eval_batches(
      val_data, global_batch_size=t.global_batch_size, micro_batch_size=t.micro_batch_size,
      max_batches=config.eval.max_batches)
  example = val_batches[0]
  if precomputed:  # Shapes only: the tables come once the weights exist.
    example = reference.add_ref_logps(example, np.zeros((len(val_data), 2), np.float32))
  train_fn, eval_fn, state_sh, ref_sh = compile_steps(
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
    tables = reference.precompute_tables(
        step_cfg, ref_cfg, params, {"train": train_data, "val": val_data},
        pairs_per_batch=t.global_batch_size, micro_batch_size=t.micro_batch_size, mesh=mesh)
    val_batches = [reference.add_ref_logps(b, tables["val"]) for b in val_batches]
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
  lead = jax.process_index() == 0
  # Records past the checkpoint we start from are redone; with no checkpoint, all of them.
  writer = MetricWriter(workdir, resume_step=start if start else -1, enabled=lead)
  say = functools.partial(print, flush=True) if lead else lambda *a, **k: None
  n_params = sum(x.size for x in jax.tree.leaves(abstract_params))
  say(f"Training on {len(train_data)} pairs ({len(val_data)} val) for {t.max_steps} steps, "
        f"{n_params:,} parameters "
        f"({sum(x.size for x in jax.tree.leaves(abstract.trainable)):,} trained), mesh "
        f"{dict(mesh.shape)}, {jax.process_count()} process(es)")

  def data_state():
    return {"iterator": train_iter.get_state(), "consumed_samples": consumed}

  peak = t.peak_flops if t.peak_flops != 0 else matmul_peak_flops(dtype=step_cfg.model.dtype)
  throughput = metrics_lib.Throughput(metrics_lib.flops_per_token(
      n_params, reference=step_cfg.reference, lora=step_cfg.lora is not None), peak)
  bar = metrics_lib.progress_bar(t.max_steps, start, lead)

  def validate(step):
    metrics = evaluate(eval_fn, state if sync else state.params, ref_params, val_batches, mesh)
    writer.write(step, "val", metrics)
    save_checkpoint(ckpt, step, state, data_state(), config, say, best_loss=metrics["loss"])
    return metrics

  eval_interval = config.eval.interval
  if config.eval.get("interval_epochs", 0.0) > 0:  # A fraction of an epoch, in whole steps.
    epoch_steps = pipeline.steps_per_epoch(train_data, t.global_batch_size, t.seed)
    eval_interval = max(1, round(config.eval.interval_epochs * epoch_steps))
    say(f"Validating every {eval_interval} steps ({config.eval.interval_epochs} of an epoch "
        f"of {epoch_steps:.1f} steps)")
  last_val = None
  if start == 0 and config.eval.at_start and stop.signal is None:
    last_val = validate(0)
  tick, tick_step = time.perf_counter(), start
  step, nonfinite_total, nonfinite_run = start, 0, 0
  while step < t.max_steps and stop.signal is None:
    host_batch = next(train_iter)
    if precomputed:
      host_batch = reference.add_ref_logps(host_batch, tables["train"])
    state, metrics = train_fn(state, ref_params, sharding.global_batch(host_batch, mesh))
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
          f"(pairs: {describe_pairs(host_batch, train_data)})")
      if nonfinite_run >= t.max_consecutive_nonfinite:
        close_checkpoints(ckpt, config, say)
        raise NonFiniteError(
            f"{nonfinite_run} consecutive non-finite steps (train.max_consecutive_nonfinite="
            f"{t.max_consecutive_nonfinite}) at step {step}; stopping. The last good "
            f"checkpoint is step {ckpt.latest_step()} in {ckpt.directory}.")
    else:
      nonfinite_run = 0
    if step % t.log_interval == 0 or step == t.max_steps:
      metrics = loss_lib.finalize_metrics(jax.device_get(metrics))
      now = time.perf_counter()
      metrics["step_time"] = (now - tick) / (step - tick_step)
      metrics["consumed_samples"] = consumed
      metrics["nonfinite_steps"] = nonfinite_total
      metrics.update(throughput.report())
      tick, tick_step = now, step
      writer.write(step, "train", metrics)
    if step % eval_interval == 0 or step == t.max_steps:
      last_val = validate(step)
    if (step % config.checkpoint.interval == 0 or step == t.max_steps
        or stop.signal is not None):
      save_checkpoint(ckpt, step, state, data_state(), config, say)
  bar.close()
  close_checkpoints(ckpt, config, say)
  writer.close()
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
  if lead:
    from dpojax import plot  # pylint: disable=g-import-not-at-top (matplotlib loads here only)
    try:
      say(f"Wrote {plot.plot_metrics(workdir)}")
    except (OSError, ValueError) as e:
      say(f"WARNING: training curves not drawn ({e})")
  if config.export.to and stop.signal is None:
    policy = state.params
    if step_cfg.lora is not None:  # Adapters folded into the base.
      policy = jax.jit(functools.partial(reference.policy_params, step_cfg))(
          state.params, ref_params)
    host_params = multihost_utils.process_allgather(policy, tiled=True)
    if lead:
      export(config, step_cfg.model, host_params, tok.path, workdir_lib.init_path(config))
      say(f"Exported the policy to {config.export.to}")
  return {"state": state, "val": last_val, "step": step}
