"""Jinja chat templates (data.template=auto), rendered as transformers' `apply_chat_template`.

The environment is transformers' own (`_compile_jinja_template`): jinja2's
ImmutableSandboxedEnvironment with trim_blocks, lstrip_blocks and loopcontrols; the `tojson`
filter without HTML escaping; `raise_exception`, `strftime_now`, and its `dict`/`namespace`
guards; the tokenizer's special tokens (bos_token, eos_token, ...) as variables.

A pair (TRL's rule): the prompt is the conversation before the final assistant turn rendered
with add_generation_prompt=True; each response is the rest of the conversation rendered whole
with that turn. The prompt must be a string prefix of both renderings: a template that renders
earlier turns differently once a later one follows (e.g. one that drops the reasoning of
earlier assistant turns, or adds the generation header differently) fails that check, and the
record raises a RecordError ("template not prefix-stable"; data.on_error=skip skips it).
"""

from __future__ import annotations

from datetime import datetime
import functools
import json

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dpojax.data import templates


def _raise_exception(message):
  raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
  # transformers' filter: jinja's own escapes HTML characters.
  return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                    sort_keys=sort_keys)


def _strftime_now(fmt):
  return datetime.now().strftime(fmt)


class _TemplateDict:
  """`dict` without attribute access to the type (transformers' guard)."""

  def __call__(self, *args, **kwargs):
    return dict(*args, **kwargs)

  def fromkeys(self, *args, **kwargs):
    return dict.fromkeys(*args, **kwargs)


class _Namespace(jinja2.utils.Namespace):
  """A namespace that refuses underscore names (transformers' guard)."""

  def __init__(*args, **kwargs):  # pylint: disable=no-method-argument
    self, args = args[0], args[1:]
    attrs = dict(*args, **kwargs)
    for name in attrs:
      _Namespace._check(name)
    jinja2.utils.Namespace.__init__(self, attrs)

  def __setitem__(self, name, value):
    _Namespace._check(name)
    jinja2.utils.Namespace.__setitem__(self, name, value)

  @staticmethod
  def _check(name):
    if isinstance(name, str) and name.startswith("_"):
      raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} starts with '_'")


@functools.lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                      extensions=[jinja2.ext.loopcontrols])
  env.filters["tojson"] = _tojson
  env.globals["raise_exception"] = _raise_exception
  env.globals["strftime_now"] = _strftime_now
  env.globals["dict"] = _TemplateDict()
  env.globals["namespace"] = _Namespace
  return env.from_string(source)


def render(source: str, messages: list[dict], *, add_generation_prompt: bool = False,
           variables: dict | None = None) -> str:
  """The template applied to `messages` (transformers' apply_chat_template(tokenize=False))."""
  return compile_template(source).render(messages=messages, tools=None, documents=None,
                                         add_generation_prompt=add_generation_prompt,
                                         **(variables or {}))


class NotPrefixError(ValueError):
  """The rendered prompt is not a prefix of a full rendering."""

  def __init__(self, side: str, prompt: str, full: str):
    n = next((i for i, (a, b) in enumerate(zip(prompt, full)) if a != b), len(full))
    super().__init__(
        f"the chat template is not prefix-stable: the prompt rendered with "
        f"add_generation_prompt=True is not a prefix of the conversation rendered with the "
        f"{side} response (they differ at character {n}: {prompt[n:n + 40]!r} vs "
        f"{full[n:n + 40]!r})")
    self.side = side


def render_pair(record: dict, source: str, variables: dict) -> tuple[str, dict]:
  """(prompt text, {"chosen": response text, "rejected": response text}) of a normalized
  record (dpojax.data.sources): the prompt messages (a string prompt is one user turn, an
  HH-RLHF dialogue its turns), each response one final assistant message."""
  messages = templates.prompt_messages(record)
  prompt = render(source, messages, add_generation_prompt=True, variables=variables)
  out = {}
  for side in ("chosen", "rejected"):
    full = render(source, messages + [{"role": "assistant", "content": record[side]}],
                  variables=variables)
    if not full.startswith(prompt):
      raise NotPrefixError(side, prompt, full)
    out[side] = full[len(prompt):]
  return prompt, out
