"""Text generation with a KV cache: greedy, temperature, top-k and top-p sampling.

  python -m dpojax.generate --checkpoint WORKDIR --prompt "Count from 3 to 6."
  python -m dpojax.generate --checkpoint model.nemo --input prompts.jsonl --output out.jsonl
  python -m dpojax.generate --checkpoint WORKDIR --input val.jsonl --compare_reference

--checkpoint is a dpojax workdir (its latest checkpoint, or a checkpoints/<step> folder), a
.nemo file or a Hugging Face folder. Prompts are rendered with the run's training template
(data.template, data.add_bos from the workdir's run_config.json), so the model sees exactly
what it was trained on; a .nemo or Hugging Face checkpoint uses its own chat template where
its tokenizer folder has one (--template/--add_bos override either).
--input is JSONL with a `prompt` per line (a string or a list of chat messages; preference
files in the nemo/trl formats work as they are).

Library:
  ids = generate(params, cfg, [prompt_ids, ...], max_new_tokens=64, sampling=Sampling(...))

Each batch of prompts is left-padded (segment 0, per-row positions), prefilled in one
forward pass, then decoded one token at a time inside one jitted `lax.while_loop`, which stops
when every row has produced a stop id. Compiled once per (batch, padded prompt length, new
tokens); prompt lengths are padded up to a multiple of `bucket` to reuse compilations.
"""

from __future__ import annotations

from dpojax import hostmem

hostmem.retain_freed_memory()  # Before any import starts threads.

# pylint: disable=wrong-import-position
import argparse
import dataclasses
import functools
import json
import os
import shutil
import sys
import tempfile
import textwrap
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dpojax import cli
from dpojax import pretrained
from dpojax.data import chat_template, templates
from dpojax.data.sources import DataError, jsonl_records, where
from dpojax.data.tokenize import (TEMPLATES, describe_template, load_tokenizer,
                                  resolve_template)
from dpojax.model import transformer
from dpojax.ops import logprob_chunked

# Template markers that end a response (besides EOS), used as default stop ids.
TEMPLATE_STOPS = {"nemo": templates.EXTRA_1, "chatml": templates.IM_END}


@dataclasses.dataclass(frozen=True)
class Sampling:
  """temperature 0 = greedy (argmax); top_k 0 and top_p 1 = no truncation."""

  temperature: float = 0.0
  top_k: int = 0
  top_p: float = 1.0

  def __post_init__(self):
    if not self.temperature >= 0:
      raise ValueError(f"--temperature={self.temperature} must be >= 0")
    if self.top_k < 0:
      raise ValueError(f"--top_k={self.top_k} must be >= 0 (0 = off)")
    if not 0 < self.top_p <= 1:
      raise ValueError(f"--top_p={self.top_p} must be in (0, 1]")


def filter_logits(logits_BxV, top_k: int = 0, top_p: float = 1.0):
  """Sets logits outside the top-k, then outside the top-p nucleus, to -inf.

  The nucleus is the smallest set of most likely tokens whose probability reaches top_p (the
  most likely token always stays), as in Hugging Face's TopPLogitsWarper.
  """
  logits_BxV = logits_BxV.astype(jnp.float32)
  if top_k > 0 and top_k < logits_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(logits_BxV, top_k)[0][:, -1:]
    logits_BxV = jnp.where(logits_BxV < kth_Bx1, -jnp.inf, logits_BxV)
  if top_p < 1.0:
    sorted_BxV = jnp.sort(logits_BxV, axis=-1)[:, ::-1]
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # Mass of the more likely ones.
    keep_BxV = before_BxV < top_p
    # The least likely kept logit; ties with it stay too.
    cutoff_Bx1 = jnp.min(jnp.where(keep_BxV, sorted_BxV, jnp.inf), axis=-1, keepdims=True)
    logits_BxV = jnp.where(logits_BxV < cutoff_Bx1, -jnp.inf, logits_BxV)
  return logits_BxV


def sample(logits_BxV, rng, sampling: Sampling):
  if sampling.temperature == 0:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  logits_BxV = filter_logits(logits_BxV / sampling.temperature, sampling.top_k, sampling.top_p)
  return jax.random.categorical(rng, logits_BxV, axis=-1).astype(jnp.int32)


def _logits(params, cfg, hidden_BxD):
  """Next-token logits [B, V] in fp32, final-logit softcapped as the log-probs are."""
  w_VxD = transformer.output_weight(params, cfg)
  logits_BxV = jnp.einsum("bd,vd->bv", hidden_BxD, w_VxD.astype(hidden_BxD.dtype),
                          preferred_element_type=jnp.float32, precision="highest")
  return logprob_chunked.softcap(logits_BxV, cfg.final_logit_softcap)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "sampling", "pad_id"))
def generate_batch(params, tokens_BxP, lengths_B, stop_ids_S, rng, *, cfg, max_new_tokens: int,
                   sampling: Sampling, pad_id: int = 0):
  """Left-padded prompts (row b's tokens end at column P) -> [B, max_new_tokens] new ids.

  After a row's first stop id (any entry of stop_ids_S; pad it with -1) later ids are `pad_id`.
  """
  b, p = tokens_BxP.shape
  pad_B = p - lengths_B
  slots_BxP = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
  segments_BxP = (slots_BxP >= pad_B[:, None]).astype(jnp.int32)
  positions_BxP = jnp.maximum(slots_BxP - pad_B[:, None], 0)
  cache = transformer.init_cache(cfg, b, p + max_new_tokens)
  hidden_BxPxD, cache = transformer.decode(params, cfg, cache, tokens_BxP, positions_BxP,
                                           segments_BxP)
  rng, step_rng = jax.random.split(rng)
  token_B = sample(_logits(params, cfg, hidden_BxPxD[:, -1]), step_rng, sampling)
  out_BxN = jnp.full((b, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token_B)
  done_B = jnp.isin(token_B, stop_ids_S)

  def cond(state):
    i, _, _, _, done_B, _ = state
    return (i < max_new_tokens) & ~jnp.all(done_B)

  def body(state):
    i, token_B, cache, out_BxN, done_B, rng = state
    # The token sampled last enters the cache at its row's next position.
    hidden_Bx1xD, cache = transformer.decode(
        params, cfg, cache, token_B[:, None], (lengths_B + i - 1)[:, None],
        jnp.ones((b, 1), jnp.int32))
    rng, step_rng = jax.random.split(rng)
    token_B = sample(_logits(params, cfg, hidden_Bx1xD[:, 0]), step_rng, sampling)
    out_BxN = out_BxN.at[:, i].set(jnp.where(done_B, pad_id, token_B))
    return i + 1, token_B, cache, out_BxN, done_B | jnp.isin(token_B, stop_ids_S), rng

  state = (jnp.asarray(1, jnp.int32), token_B, cache, out_BxN, done_B, rng)
  return jax.lax.while_loop(cond, body, state)[3]


def generate(params, cfg: transformer.ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (),
             seed: int = 0, batch_size: int | None = None, bucket: int = 16,
             pad_id: int = 0) -> list[list[int]]:
  """New ids for each prompt, up to (not including) its first stop id."""
  if max_new_tokens < 1:
    raise ValueError(f"--max_new_tokens={max_new_tokens} must be >= 1")
  for i, ids in enumerate(prompts):
    if not len(ids):
      raise ValueError(f"prompt {i} has no tokens (an empty prompt needs add_bos)")
    if min(ids) < 0 or max(ids) >= cfg.vocab_size:
      raise ValueError(f"prompt {i} has ids outside the model's vocabulary [0, {cfg.vocab_size})")
  longest = max(len(ids) for ids in prompts)
  if (cfg.position_embedding_type == "learned_absolute"
      and longest + max_new_tokens > cfg.max_position_embeddings):
    raise ValueError(f"prompt length {longest} + --max_new_tokens={max_new_tokens} exceeds the "
                     f"model's max_position_embeddings={cfg.max_position_embeddings}")
  batch_size = batch_size or len(prompts)
  params = jax.device_put(params)  # Once, not once per batch.
  stop_ids = sorted({int(s) for s in stop_ids})
  # An array argument, padded to a multiple of 8: other stop ids reuse the compilation.
  stops_S = np.full(-(-max(len(stop_ids), 1) // 8) * 8, -1, np.int32)
  stops_S[:len(stop_ids)] = stop_ids
  out = []
  for start in range(0, len(prompts), batch_size):
    chunk = list(prompts[start:start + batch_size])
    lengths = [len(ids) for ids in chunk] + [1] * (batch_size - len(chunk))  # Fixed batch.
    p = -(-max(lengths) // bucket) * bucket
    tokens = np.full((batch_size, p), pad_id, np.int32)
    for row, ids in enumerate(chunk):
      tokens[row, p - len(ids):] = ids
    rng = jax.random.fold_in(jax.random.key(seed), start)
    new = np.asarray(generate_batch(
        params, tokens, np.asarray(lengths, np.int32), stops_S, rng, cfg=cfg,
        max_new_tokens=max_new_tokens, sampling=sampling, pad_id=pad_id))
    for row in range(len(chunk)):
      ids = new[row].tolist()
      stop = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
      out.append(ids[:stop])
  return out


# --- prompts ---------------------------------------------------------------------------------
def prompt_ids(tok, prompt: str | list[dict], template: str = "plain",
               add_bos: bool = True) -> list[int]:
  """The prompt's ids exactly as training tokenizes it (dpojax.data.tokenize.tokenize_pair)."""
  dialogue = isinstance(prompt, str) and "\n\nHuman:" in prompt  # An HH-RLHF style prompt.
  record = {"prompt": prompt, "chosen": "", "rejected": "", "dialogue": dialogue}
  if template == "auto" and tok.chat_template is not None:
    text = chat_template.render(tok.chat_template, templates.prompt_messages(record),
                                add_generation_prompt=True, variables=tok.template_variables())
    ids = tok.encode_rendered(text)
    bos = tok.special(templates.BOS) if add_bos else []
    return (bos if bos and ids[:len(bos)] != bos else []) + ids
  template = "plain" if template == "auto" else template
  parts, _ = templates.render(record, template)
  ids = tok.special(templates.BOS) if add_bos else []
  return ids + tok.encode_parts(parts)


def default_stop_ids(tok, template: str) -> list[int]:
  """EOS and the checkpoint's generation_config.json eos ids, plus the template's end-of-turn
  marker when the vocabulary has it as one piece."""
  ids = list(tok.stop_ids)
  marker = TEMPLATE_STOPS.get(template)
  if marker is not None and len(tok.special(marker)) == 1:
    ids += tok.special(marker)
  return ids


def read_prompts(path: str) -> list[str | list[dict]]:
  """`prompt` of every line of a JSONL file (blank lines skipped); errors name file:line."""
  prompts = []
  try:
    f = open(path)
  except OSError as e:
    raise DataError(f"--input={path}: cannot read ({e.strerror})") from None
  with f:
    for line_no, obj in jsonl_records(f, path):
      if not isinstance(obj, dict) or "prompt" not in obj:
        raise DataError(f"{where(path, line_no, 'prompt')}: missing")
      value = obj["prompt"]
      if isinstance(value, list):
        for i, m in enumerate(value):
          if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                  and isinstance(m.get("content"), str)):
            raise DataError(f"{where(path, line_no, f'prompt[{i}]')}: expected "
                            "{\"role\": system|user|assistant, \"content\": str}")
      elif not isinstance(value, str):
        raise DataError(f"{where(path, line_no, 'prompt')}: expected a string or a message "
                        f"list, got {type(value).__name__}")
      prompts.append(value)
  if not prompts:
    raise DataError(f"--input={path}: no prompts")
  return prompts


def side_by_side(left: str, right: str, width: int, titles=("policy", "reference")) -> str:
  col = max((width - 3) // 2, 20)
  wrap = lambda text: [w for para in text.split("\n")
                       for w in (textwrap.wrap(para, col) or [""])]
  a, b = [titles[0]] + wrap(left), [titles[1]] + wrap(right)
  a += [""] * (len(b) - len(a))
  b += [""] * (len(a) - len(b))
  rows = [f"{x:<{col}} | {y}".rstrip() for x, y in zip(a, b)]
  rows.insert(1, "-" * col + "-+-" + "-" * col)
  return "\n".join(rows)


# --- command line ----------------------------------------------------------------------------
def _parse_ids(text: str | None) -> list[int] | None:
  if text is None:
    return None
  try:
    return [int(x) for x in text.split(",") if x.strip()]
  except ValueError:
    raise ValueError(f"--stop_ids={text!r}: expected comma-separated integers") from None


def main(argv=None) -> int:
  return cli.run(_main, argv)


def _main(argv) -> int:
  parser = argparse.ArgumentParser(prog="python -m dpojax.generate",
                                   description=__doc__.split("\n\n", maxsplit=1)[0])
  parser.add_argument("--checkpoint", required=True,
                      help="dpojax workdir (or checkpoints/<step>), .nemo file or HF folder")
  parser.add_argument("--prompt", action="append", default=[],
                      help="a prompt (repeat for several)")
  parser.add_argument("--input", help="JSONL with a 'prompt' field per line")
  parser.add_argument("--output", help="write JSONL results here (default: print)")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
  parser.add_argument("--top_k", type=int, default=0, help="0 = off")
  parser.add_argument("--top_p", type=float, default=1.0, help="1 = off")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--stop_ids", default=None,
                      help="comma-separated ids that end an answer (default: EOS and the "
                      "template's end marker; stories260K ends a story with BOS: 1)")
  parser.add_argument("--batch_size", type=int, default=8)
  parser.add_argument("--compare_reference", action="store_true",
                      help="also answer with the run's reference (init.path, or the random "
                      "init from train.seed) and print both side by side")
  parser.add_argument("--reference", default=None,
                      help="the reference checkpoint to compare with (default: the run's)")
  parser.add_argument("--template", choices=TEMPLATES, default=None,
                      help="prompt template (default: the run's data.template; for a .nemo or "
                      "Hugging Face folder, its own chat template where it has one, else plain)")
  parser.add_argument("--add_bos", choices=("true", "false"), default=None,
                      help="prepend BOS (default: the run's data.add_bos, else true)")
  parser.add_argument("--tokenizer", default=None,
                      help="tokenizer.model or tokenizer.json (default: the checkpoint's or the "
                      "run's)")
  parser.add_argument("--config", default=None,
                      help="run config (.json or .py) for a workdir without run_config.json")
  cli.add_debug_flag(parser)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory(prefix="dpojax-generate-") as tmp:
    results = _run(args, tmp)
  if args.output:
    with open(args.output, "w") as f:
      for r in results:
        f.write(json.dumps(r) + "\n")
    print(f"Wrote {len(results)} answers to {args.output}")
    return 0
  width = shutil.get_terminal_size((120, 24)).columns
  for i, r in enumerate(results):
    prompt = r["prompt"] if isinstance(r["prompt"], str) else json.dumps(r["prompt"])
    print(f"=== prompt {i + 1}: {prompt}")
    if "reference" in r:
      print(side_by_side(r["policy"], r["reference"], width))
    else:
      print(r["policy"])
  return 0


def _run(args, tmp: str) -> list[dict[str, Any]]:

  sampling = Sampling(args.temperature, args.top_k, args.top_p)
  if args.batch_size < 1:
    raise ValueError(f"--batch_size={args.batch_size} must be >= 1")
  prompts = list(args.prompt) + (read_prompts(args.input) if args.input else [])
  if not prompts:
    raise ValueError("give --prompt TEXT or --input FILE.jsonl")
  policy = pretrained.load_policy(args.checkpoint, config_path=args.config,
                                  extract_dir=os.path.join(tmp, "policy"))
  if args.compare_reference and not args.reference and policy.run_config is None:
    raise ValueError(f"--compare_reference: {args.checkpoint} is not a dpojax workdir, so it "
                     "records no reference; pass --reference PATH")
  run_cfg = policy.run_config
  data_cfg = run_cfg.data if run_cfg is not None else {}
  add_bos = (data_cfg.get("add_bos", True) if args.add_bos is None else args.add_bos == "true")
  tokenizer_path = args.tokenizer or policy.tokenizer_path
  if not tokenizer_path:
    raise ValueError(f"{args.checkpoint}: holds no tokenizer; pass --tokenizer")
  tok = load_tokenizer(tokenizer_path)
  # The run's template, else (a .nemo or Hugging Face folder) the checkpoint's own chat
  # template where it has one; an explicit --template that differs from that one warns.
  template, warning = resolve_template(args.template or data_cfg.get("template", "auto"), tok,
                                       "--template")
  if warning and args.template:
    print(warning, file=sys.stderr, flush=True)
  stop_ids = _parse_ids(args.stop_ids)
  if stop_ids is None:
    stop_ids = default_stop_ids(tok, template)
  ids = [prompt_ids(tok, p, template, add_bos) for p in prompts]
  run = functools.partial(generate, prompts=ids, max_new_tokens=args.max_new_tokens,
                          sampling=sampling, stop_ids=stop_ids, seed=args.seed,
                          batch_size=min(args.batch_size, len(ids)))
  answers = run(policy.params, policy.config)
  for i, a in enumerate(answers):
    if not a:  # Often a prompt in a format the model was not tuned on.
      print(f"WARNING: prompt {i + 1}: the first token generated was a stop id "
            f"({describe_template(template, tok)}); pass --template or --stop_ids to change "
            "either", file=sys.stderr, flush=True)
  results = [{"prompt": p, "policy": tok.decode(a), "policy_ids": a}
             for p, a in zip(prompts, answers)]
  if args.compare_reference:
    ref_cfg, ref_params = _reference(args, policy, tmp)
    for r, a in zip(results, run(ref_params, ref_cfg)):
      r["reference"], r["reference_ids"] = tok.decode(a), a
  return results


def _reference(args, policy, tmp: str):

  if args.reference:
    ref = pretrained.load_policy(args.reference, extract_dir=os.path.join(tmp, "reference"))
    return ref.config, ref.params
  return policy.config, pretrained.load_reference(policy,
                                                   extract_dir=os.path.join(tmp, "reference"))


if __name__ == "__main__":
  sys.exit(main())
