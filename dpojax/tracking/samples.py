"""What the policy now says: greedy answers to fixed validation prompts at every evaluation.

  eval.num_samples = 2            # The first N pairs of the validation split; 0 = off.
  eval.sample_max_new_tokens = 32
  eval.sample_reference = False   # Also the reference's answer (once; again after a TR-DPO sync).
  eval.sample_chosen = True       # Also the data's chosen response.

The prompts are the validation pairs' own, rendered as `python -m dpojax.generate` renders
them (the data's template and add_bos), so an answer here equals generate's on that step's
checkpoint. The KV-cache generator (dpojax.generate) is compiled once per run: the same
prompts, batch and lengths every time. Every process runs it (the weights are sharded);
process 0 writes the samples (samples.jsonl, TensorBoard text, W&B table, MLflow artifact).
"""

from __future__ import annotations

import jax
import numpy as np

from dpojax import generate as generate_lib
from dpojax.train import reference as reference_lib


class Sampler:

  def __init__(self, eval_cfg, val_data, tok, step_cfg):
    self.num = int(eval_cfg.get("num_samples", 0))
    self.max_new_tokens = int(eval_cfg.get("sample_max_new_tokens", 32))
    self.with_reference = bool(eval_cfg.get("sample_reference", False))
    self.with_chosen = bool(eval_cfg.get("sample_chosen", True))
    self.step_cfg, self.tok = step_cfg, tok
    self.prompts, self.ids, self.chosen = [], [], []
    if self.num <= 0:
      return
    if self.max_new_tokens < 1:
      raise ValueError(f"eval.sample_max_new_tokens={self.max_new_tokens} must be >= 1")
    opts = val_data.opts
    for i in range(min(self.num, len(val_data))):
      pair = val_data[i]
      prompt_len = int(pair["prompt_len"])
      source = getattr(val_data, "source", None)
      if source is not None and val_data.rows is None:  # The record: render its prompt.
        record = source[int(val_data.indices[i])]
        prompt, chosen = record["prompt"], record["chosen"]
        ids = generate_lib.prompt_ids(tok, prompt, opts.template, opts.add_bos)
      else:  # A packed directory holds tokens only.
        ids = np.asarray(pair["chosen"][:prompt_len]).tolist()
        prompt = tok.decode(ids)
        chosen = tok.decode(np.asarray(pair["chosen"][prompt_len:]).tolist())
      self.prompts.append(prompt)
      self.ids.append(ids)
      self.chosen.append(chosen)
    self.stop_ids = generate_lib.default_stop_ids(tok, opts.template)
    self._policy_fn = None
    self._reference_answers = None
    self._ref = reference_lib.resolve(step_cfg)

  @property
  def enabled(self) -> bool:
    return bool(self.prompts)

  def _answers(self, params) -> list[list[int]]:
    return generate_lib.generate(params, self.step_cfg.model, self.ids,
                                 max_new_tokens=self.max_new_tokens, stop_ids=self.stop_ids,
                                 batch_size=len(self.ids))

  def policy(self, trainable, frozen):
    """The policy as a plain tree (LoRA's adapters merged into the base)."""
    if not self._ref.base:  # No adapters: the trained tree is the policy.
      return trainable
    if self._policy_fn is None:
      self._policy_fn = jax.jit(lambda t, f: reference_lib.policy_params(self.step_cfg, t, f))
    return self._policy_fn(trainable, frozen)

  def __call__(self, step: int, trainable, frozen, state_ref=None) -> list[dict]:
    """The samples of this evaluation (every process computes them)."""
    answers = self._answers(self.policy(trainable, frozen))
    out = []
    for prompt, ids, answer, chosen in zip(self.prompts, self.ids, answers, self.chosen):
      sample = {"step": int(step), "prompt": prompt, "prompt_ids": ids,
                "policy": self.tok.decode(answer), "policy_ids": answer}
      if self.with_chosen:
        sample["chosen"] = chosen
      out.append(sample)
    if self.with_reference and self._ref.weights is not None:
      if self._reference_answers is None or state_ref is not None:  # TR-DPO moves it.
        tree = reference_lib.frozen_tree(state_ref, frozen, self.step_cfg)
        weights = tree[self._ref.weights] if self._ref.weights else tree
        self._reference_answers = self._answers(weights)
      for sample, answer in zip(out, self._reference_answers):
        sample["reference"] = self.tok.decode(answer)
        sample["reference_ids"] = answer
    return out
