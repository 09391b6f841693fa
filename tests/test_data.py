import json
import os

import numpy as np
import pytest

from dpojax.data import pipeline
from dpojax.data.sources import DataError, JsonlSource
from dpojax.data.tokenize import Tokenizer

from conftest import ROOT

TOKENIZER = os.path.join(ROOT, "dpojax", "assets", "tokenizer.model")
GOOD = {"prompt": "Count from 1 to 4.", "chosen_response": "1 2 3 4",
        "rejected_response": "4 3 2 1"}
OPTS = pipeline.DataOptions(max_seq_length=32)


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOKENIZER)


def write_lines(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("".join(l + "\n" for l in lines))
  return str(path)


@pytest.mark.parametrize("bad_line,field,problem", [
    ('{"prompt": "x", "chosen_response": "a", ', None, "invalid JSON"),
    ('["a", "b"]', None, "expected a JSON object"),
    ('{"prompt": "x", "rejected_response": "b"}', "chosen_response", "missing"),
    ('{"prompt": 3, "chosen_response": "a", "rejected_response": "b"}', "prompt",
     "expected a string, got int"),
    ('{"prompt": "x", "chosen_response": "a", "rejected_response": "  "}', "rejected_response",
     "empty response"),
    ('{"prompt": "x", "chosen_response": "a", "rejected_response": "b", "chosen_reward": "hi"}',
     "chosen_reward", "expected a finite number"),
])
def test_malformed_lines_name_file_line_and_field(tmp_path, tok, bad_line, field, problem):
  # Line 3 is bad; a blank line 2 must not shift the reported line number.
  path = write_lines(tmp_path, [json.dumps(GOOD), "", bad_line, json.dumps(GOOD)])
  with pytest.raises(DataError) as e:
    pipeline.PreferenceData(path, tok, OPTS)
  message = str(e.value)
  assert message.startswith(f"{path}:3")
  assert problem in message
  if field:
    assert f"field '{field}'" in message


def test_fewer_pairs_than_global_batch_is_a_clear_error(tmp_path, tok):
  path = write_lines(tmp_path, [json.dumps(GOOD)] * 3)
  data = pipeline.PreferenceData(path, tok, OPTS)
  with pytest.raises(DataError, match=r"3 usable pairs .* fewer than train.global_batch_size=4"):
    pipeline.train_dataset(data, global_batch_size=4, micro_batch_size=2, seed=0)


def test_missing_files_are_named(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl: no such data file"):
    JsonlSource(str(tmp_path / "nope.jsonl"))
  with pytest.raises(DataError, match="tokenizer model file not found"):
    Tokenizer(str(tmp_path / "nope.model"))


def test_source_is_random_access_by_offset(tmp_path):
  rows = [dict(GOOD, prompt=f"p{i}") for i in range(5)]
  path = write_lines(tmp_path, [json.dumps(r) for r in rows[:2]] + [""] + [json.dumps(r) for r in rows[2:]])
  src = JsonlSource(path)
  assert len(src) == 5
  assert src[3]["prompt"] == "p3" and src[3]["line"] == 5


def test_over_long_pairs_are_dropped_and_counted(tmp_path, tok):
  long = dict(GOOD, rejected_response=" ".join(["word"] * 100))
  path = write_lines(tmp_path, [json.dumps(GOOD), json.dumps(long), json.dumps(GOOD)])
  data = pipeline.PreferenceData(path, tok, OPTS)
  assert (len(data), data.dropped) == (2, 1)


def test_collate_layout(tok):
  record = dict(GOOD, chosen_reward=0.5)
  pair = pipeline.PreferenceData.tokenize(type("D", (), {"tok": tok, "opts": OPTS})(), record)
  prompt_ids = [tok.bos_id] + tok.encode(GOOD["prompt"])
  assert pair["prompt_len"] == len(prompt_ids)
  np.testing.assert_array_equal(pair["chosen"],
                                prompt_ids + tok.encode(GOOD["chosen_response"]) + [tok.eos_id])
  batch = pipeline.collate([pair, None, pair, pair], micro_batch_size=2, seq_len=32, opts=OPTS)
  assert batch["tokens"].shape == (2, 4, 32)
  assert batch["pair_mask"].tolist() == [[1, 0], [1, 1]]
  n_c, n_r = len(pair["chosen"]), len(pair["rejected"])
  row_c, row_r = batch["tokens"][0, 0], batch["tokens"][0, 1]
  np.testing.assert_array_equal(row_c[:n_c], pair["chosen"])
  np.testing.assert_array_equal(row_r[:n_r], pair["rejected"])
  assert batch["loss_mask"][0, 0].tolist() == [0] * pair["prompt_len"] + [1] * (
      n_c - pair["prompt_len"]) + [0] * (32 - n_c)
  assert batch["sequence_ids"][1, 3, 0] == 3 and batch["sequence_ids"][1, 3, n_r] == -1
  assert batch["positions"][0, 0, :n_c].tolist() == list(range(n_c))
  assert batch["chosen_reward"][0].tolist() == [0.5, 0.0]  # Padding pair gets zeros.
  assert batch["rejected_reward"][1].tolist() == [0.0, 0.0]  # Default rejected reward.


def test_train_dataset_reshuffles_each_epoch_and_resumes(tmp_path, tok):
  rows = [dict(GOOD, prompt=f"Count from {i}.") for i in range(6)]
  path = write_lines(tmp_path, [json.dumps(r) for r in rows])
  data = pipeline.PreferenceData(path, tok, OPTS)
  ds = pipeline.train_dataset(data, global_batch_size=2, micro_batch_size=1, seed=3)
  it = iter(ds)
  batches = [next(it) for _ in range(6)]
  pairs = lambda bs: [tuple(b["tokens"][a, 0]) for b in bs for a in range(2)]
  epoch1, epoch2 = pairs(batches[:3]), pairs(batches[3:])
  assert len(set(epoch1)) == 6 and sorted(epoch1) == sorted(epoch2) and epoch1 != epoch2
  it = iter(ds)
  for _ in range(4):
    next(it)
  state = it.get_state()
  resumed = iter(ds)
  resumed.set_state(json.loads(json.dumps(state)))
  np.testing.assert_array_equal(next(resumed)["tokens"], batches[4]["tokens"])
