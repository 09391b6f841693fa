"""KTO's unpaired examples as the pipeline's pairs: each example with its KL sequence.

TRL's KTOTrainer (1.16, `_prepare_dataset`) reads {prompt, completion, label} examples and, to
estimate the KL term, gives every example a mismatched completion: within each run of
`per_device_train_batch_size` examples in file order, example i takes the completion of
example i - 1 (the first takes the last's): (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}).

`UnpairedSource` wraps a source (sources.JsonlSource or arrow_sources.ArrowSource) and serves
example i as a pair-shaped record, so that tokenizing, length fitting, padding, packing (a
shared prompt included: both sequences have prompt i), sharding and every reference mode
(precomputed: the KL sequence's reference log-prob is the pair's second one) work unchanged:
  prompt   = example i's prompt,
  chosen   = example i's completion               (the sequence KTO scores),
  rejected = example partner(i)'s completion      (the KL sequence x_i + y_partner(i)),
  chosen_reward = 1.0 (desirable) or 0.0 (the label, read by dpojax.loss_kto).
A paired file (nemo, trl, hh-rlhf) is split into examples on request (`data.unpair`), as
TRL's `unpair_preference_dataset`: each block of 1000 pairs (`datasets.map`'s default batch)
gives its chosen responses (label true) and then its rejected ones (label false).
The KL sequence is the joint text prompt_i + completion_j tokenized like any response (TRL
concatenates the token ids; the two differ only where a token straddles the boundary).
"""

from __future__ import annotations

from dpojax.data.sources import DataError, where

UNPAIR_BLOCK = 1000  # datasets.Dataset.map's default batch_size (unpair_preference_dataset).


def kl_partner(i: int, n: int, chunk: int) -> int:
  """TRL's rotation by one within consecutive chunks of `chunk` examples of n."""
  start = (i // chunk) * chunk
  return i - 1 if i > start else min(start + chunk, n) - 1


class UnpairedSource:
  """Examples (with their KL completions) of an unpaired file, or of a paired one split."""

  def __init__(self, source, chunk: int, unpair: bool = False):
    self.inner, self.chunk, self.unpair = source, max(int(chunk), 1), unpair
    self.path = source.path
    if source.format == "kto":
      if unpair:
        raise DataError(f"{source.path}: data.unpair=True, but the file is already unpaired "
                        "(prompt, completion, label)")
      self.num_pairs = None
    elif not unpair:
      raise DataError(f"{where(source.path, source.line_number(0) if len(source) else 1)}: "
                      f"paired records ({source.format}) for an unpaired loss (KTO); give "
                      "{prompt, completion, label} records, or set data.unpair=True to split "
                      "each pair into a desirable and an undesirable example")
    else:
      self.num_pairs = len(source)
    self.format = source.format

  def __len__(self) -> int:
    return len(self.inner) if self.num_pairs is None else 2 * self.num_pairs

  def _pair_side(self, i: int) -> tuple[int, int]:
    """Example i of a split paired file: (pair index, 0 chosen / 1 rejected)."""
    block, within = divmod(i, 2 * UNPAIR_BLOCK)
    first = block * UNPAIR_BLOCK
    size = min(UNPAIR_BLOCK, self.num_pairs - first)
    return (first + within, 0) if within < size else (first + within - size, 1)

  def line_number(self, i: int):
    return self.inner.line_number(i if self.num_pairs is None else self._pair_side(i)[0])

  def raw(self, i: int):
    return self.inner.raw(i if self.num_pairs is None else self._pair_side(i)[0])

  def example(self, i: int) -> dict:
    """Example i: {prompt, completion, label, line, source, dialogue}."""
    if self.num_pairs is None:
      return self.inner[i]
    pair, side = self._pair_side(i)
    record = self.inner[pair]
    return {"prompt": record["prompt"], "completion": record[("chosen", "rejected")[side]],
            "label": side == 0, "line": record["line"], "source": record["source"],
            "dialogue": record["dialogue"]}

  def __getitem__(self, i: int) -> dict:
    example = self.example(i)
    partner = self.example(kl_partner(i, len(self), self.chunk))
    return {"prompt": example["prompt"], "chosen": example["completion"],
            "rejected": partner["completion"], "chosen_reward": float(example["label"]),
            "rejected_reward": None, "line": example["line"], "source": example["source"],
            "dialogue": example["dialogue"], "label": example["label"]}

  def __repr__(self) -> str:
    return f"UnpairedSource({self.inner!r}, chunk={self.chunk}, unpair={self.unpair})"
