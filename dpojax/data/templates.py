"""Prompt templates (`data.template`): a normalized record -> prompt and response parts.

A part is text (a str, tokenized) or a `Special` marker: BOS/EOS ids, or a template marker
such as <extra_id_1> or <|im_start|> that becomes one id when the tokenizer has it as a piece
(else it is tokenized as text). Markers are inserted only by the template; but SentencePiece
itself matches *user-defined* pieces anywhere in text, so data containing "<extra_id_1>" gets
that id too with such a tokenizer (as in NeMo); control pieces are never matched in text.

  plain:  strings as they are; chat messages in the HH-RLHF style
          ("\\n\\nHuman: ..." / "\\n\\nAssistant:"), the response after a space.
  nemo:   NeMo's extra_id chat format, as NeMo-Aligner's DPO docs show it:
          "<extra_id_0>System\\n{system}\\n<extra_id_1>User\\n{Q}\\n<extra_id_1>Assistant\\n",
          response "{A}\\n<extra_id_1>".
  llama2: "[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{Q} [/INST]", response " {A} ", earlier
          turns closed by EOS and reopened by BOS (the first BOS is data.add_bos).
  chatml: "<|im_start|>{role}\\n{content}<|im_end|>\\n" per message, then
          "<|im_start|>assistant\\n"; response "{A}<|im_end|>".
A string prompt is one user turn under the chat templates; an HH-RLHF dialogue is split into
its turns. `data.append_eos` adds EOS after every template's response.
"""

from __future__ import annotations

import dataclasses
import re

TEMPLATES = ("plain", "nemo", "llama2", "chatml")


@dataclasses.dataclass(frozen=True)
class Special:
  name: str  # "<bos>", "<eos>", or a marker piece such as "<extra_id_1>".


BOS, EOS = Special("<bos>"), Special("<eos>")
EXTRA_0, EXTRA_1 = Special("<extra_id_0>"), Special("<extra_id_1>")
IM_START, IM_END = Special("<|im_start|>"), Special("<|im_end|>")

_HH_TURN = re.compile(r"\n\n(Human|Assistant):")


def split_dialogue(text: str) -> list[dict]:
  """An HH-RLHF prompt ("\\n\\nHuman: a\\n\\nAssistant: b ... \\n\\nAssistant:") as messages.

  The final empty assistant turn (the generation prompt) is left out; text before the first
  turn, if any, becomes a system message.
  """
  pieces = _HH_TURN.split(text)
  messages = [{"role": "system", "content": pieces[0].strip()}] if pieces[0].strip() else []
  for speaker, content in zip(pieces[1::2], pieces[2::2]):
    messages.append({"role": "user" if speaker == "Human" else "assistant",
                     "content": content.strip()})
  if messages and messages[-1]["role"] == "assistant" and not messages[-1]["content"]:
    messages.pop()
  return messages


def prompt_messages(record: dict) -> list[dict]:
  """A normalized record's prompt as chat messages."""
  prompt = record["prompt"]
  if isinstance(prompt, list):
    return prompt
  if record.get("dialogue"):
    return split_dialogue(prompt)
  return [{"role": "user", "content": prompt}]


def _system(messages):
  if messages and messages[0]["role"] == "system":
    return messages[0]["content"], messages[1:]
  return None, messages


def render(record: dict, template: str) -> tuple[list, dict]:
  """Returns (prompt parts, {"chosen": parts, "rejected": parts})."""
  if template not in TEMPLATES:
    raise ValueError(f"data.template={template!r} is not one of {TEMPLATES}")
  if template == "plain" and isinstance(record["prompt"], str):
    return [record["prompt"]], {s: [record[s]] for s in ("chosen", "rejected")}
  system, turns = _system(prompt_messages(record))
  strip = lambda side: record[side].strip()
  if template == "plain":
    text = system or ""
    for m in turns:
      text += ("\n\nHuman: " if m["role"] == "user" else "\n\nAssistant: ") + m["content"]
    return [text + "\n\nAssistant:"], {s: [" " + strip(s)] for s in ("chosen", "rejected")}
  if template == "nemo":
    parts = [EXTRA_0, f"System\n{system or ''}\n"]
    for m in turns:
      parts += [EXTRA_1, f"{'User' if m['role'] == 'user' else 'Assistant'}\n{m['content']}\n"]
    parts += [EXTRA_1, "Assistant\n"]
    return parts, {s: [strip(s) + "\n", EXTRA_1] for s in ("chosen", "rejected")}
  if template == "llama2":
    parts, first = [], True
    for m in turns:
      if m["role"] == "user":
        sys_block = f"<<SYS>>\n{system}\n<</SYS>>\n\n" if first and system else ""
        parts += ([] if first else [BOS]) + [f"[INST] {sys_block}{m['content'].strip()} [/INST]"]
        first = False
      else:
        parts += [f" {m['content'].strip()} ", EOS]
    return parts, {s: [f" {strip(s)} "] for s in ("chosen", "rejected")}
  # chatml
  parts = []
  for m in ([{"role": "system", "content": system}] if system is not None else []) + turns:
    parts += [IM_START, f"{m['role']}\n{m['content']}", IM_END, "\n"]
  parts += [IM_START, "assistant\n"]
  return parts, {s: [strip(s), IM_END] for s in ("chosen", "rejected")}
