"""Parquet files, Parquet shard folders, datasets.save_to_disk folders and JSONL: the same
conversational pairs give identical batches, bad rows name file:row:column, resume is exact,
score_* are the rewards, and `dpojax.pack` reads them too."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpojax import pack
from dpojax.data import batching, pipeline
from dpojax.data.arrow_sources import ArrowSource
from dpojax.data.sources import DataError, validate_record
from dpojax.data.tokenize import load_tokenizer
from dpojax.train import loop
import chat_fixtures
from conftest import tiny_config

SYSTEM = {"role": "system", "content": "Answer briefly."}


def conversation_rows(n=12):
  """UltraFeedback-binarized shape: whole conversations, the prompt implicit, scores."""
  rows = []
  for i in range(n):
    prompt = ([SYSTEM] if i % 3 == 0 else []) + [{"role": "user", "content": f"Question {i}?"}]
    if i % 4 == 1:  # Multi-turn.
      prompt += [{"role": "assistant", "content": "Hello!"},
                 {"role": "user", "content": f"And {i} more — naïve? 👍🏽"}]
    rows.append({
        "chosen": prompt + [{"role": "assistant", "content": f"The answer is {i}."}],
        "rejected": prompt + [{"role": "assistant", "content": "No idea." * (1 + i % 2)}],
        "score_chosen": 8.0 + i / 10, "score_rejected": 2.5})
  return rows


def write_jsonl(path, rows):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return str(path)


def write_parquet(path, rows):
  pq.write_table(pa.Table.from_pylist(rows), str(path))
  return str(path)


def write_shards(folder, rows, n_shards=2):
  os.makedirs(os.path.join(folder, "data"))
  k = (len(rows) + n_shards - 1) // n_shards
  for s in range(n_shards):
    write_parquet(os.path.join(folder, "data", f"train-{s:05d}-of-{n_shards:05d}.parquet"),
                  rows[s * k:(s + 1) * k])
  return str(folder)


def write_save_to_disk(folder, rows):
  """The layout datasets.Dataset.save_to_disk writes: Arrow stream files + state.json."""
  os.makedirs(folder)
  table = pa.Table.from_pylist(rows)
  name = "data-00000-of-00001.arrow"
  with pa.OSFile(os.path.join(folder, name), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table, max_chunksize=5)  # Several record batches, as datasets writes.
  with open(os.path.join(folder, "state.json"), "w") as f:
    json.dump({"_data_files": [{"filename": name}], "_fingerprint": "0", "_format_columns": None,
               "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
               "_split": "train"}, f)
  with open(os.path.join(folder, "dataset_info.json"), "w") as f:
    json.dump({"features": {}}, f)
  return str(folder)


WRITERS = {"jsonl": lambda d, rows: write_jsonl(d / "pairs.jsonl", rows),
           "parquet": lambda d, rows: write_parquet(d / "pairs.parquet", rows),
           "shards": lambda d, rows: write_shards(d / "shards", rows),
           "save_to_disk": lambda d, rows: write_save_to_disk(d / "saved", rows)}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
  folder = chat_fixtures.write_folder(str(tmp_path_factory.mktemp("tok")),
                                      chat_fixtures.train_bpe(), style="chatml")
  return load_tokenizer(folder)


OPTS = pipeline.DataOptions(max_seq_length=96, template="auto")


def test_every_file_type_gives_identical_batches(tmp_path, tok):
  rows = conversation_rows()
  batches = {}
  for kind, write in WRITERS.items():
    data = pipeline.PreferenceData(write(tmp_path, rows), tok, OPTS)
    assert len(data) == len(rows) and data.stats["format"] == "trl", kind
    batches[kind] = batching.eval_batches(data, global_batch_size=4, micro_batch_size=2)
  want = batches.pop("jsonl")
  np.testing.assert_allclose(want[0]["chosen_reward"].ravel(), [8.0, 8.1, 8.2, 8.3])
  np.testing.assert_allclose(want[0]["rejected_reward"].ravel(), 2.5)
  for kind, got in batches.items():
    assert len(got) == len(want)
    for g, w in zip(got, want):
      for k in w:
        np.testing.assert_array_equal(g[k], w[k], err_msg=f"{kind} {k}")


def _bad_rows():
  rows = conversation_rows(4)
  rows[2] = dict(rows[2], chosen=rows[2]["chosen"][:-1] + [{"role": "assistant",
                                                              "content": "  "}])
  return rows


@pytest.mark.parametrize("kind", ["parquet", "save_to_disk", "shards", "jsonl"])
def test_bad_rows_name_file_row_and_column(tmp_path, tok, kind):
  path = WRITERS[kind](tmp_path, _bad_rows())
  with pytest.raises(DataError) as e:
    pipeline.PreferenceData(path, tok, OPTS)
  n = len(_bad_rows()[2]["chosen"]) - 1
  if kind == "jsonl":
    want = f"{path}:3: field 'chosen[{n}].content': empty response"
  else:
    file = {"parquet": path, "save_to_disk": os.path.join(path, "data-00000-of-00001.arrow"),
            "shards": os.path.join(path, "data", "train-00001-of-00002.parquet")}[kind]
    row = 0 if kind == "shards" else 2  # The second shard's first row.
    want = f"{file}:row {row}: column 'chosen[{n}].content': empty response"
  assert str(e.value) == want


def test_null_and_equal_responses_in_parquet(tmp_path, tok):
  rows = conversation_rows(3)
  rows[1] = dict(rows[1], rejected=None)  # A null: the field is missing.
  path = write_parquet(tmp_path / "null.parquet", rows)
  with pytest.raises(DataError, match=r"null.parquet:row 1: column 'rejected': missing"):
    pipeline.PreferenceData(path, tok, OPTS)
  rows = conversation_rows(3)
  rows[0] = dict(rows[0], rejected=rows[0]["chosen"])
  path = write_parquet(tmp_path / "equal.parquet", rows)
  with pytest.raises(DataError, match=r"equal.parquet:row 0: column 'rejected': identical"):
    pipeline.PreferenceData(path, tok, OPTS)
  skipped = pipeline.PreferenceData(path, tok, pipeline.DataOptions(
      max_seq_length=96, template="auto", on_error="skip"))
  assert len(skipped) == 2 and skipped.stats["skipped_by_reason"] == {"chosen equals rejected": 1}


def test_resume_mid_epoch_from_parquet_is_exact(tmp_path, tok):
  data = pipeline.PreferenceData(write_parquet(tmp_path / "p.parquet", conversation_rows(11)),
                                 tok, OPTS)
  kw = dict(global_batch_size=2, micro_batch_size=1, seed=3)
  straight = iter(batching.train_dataset(data, **kw))
  reference = [next(straight) for _ in range(9)]  # Into the second epoch.
  it = iter(batching.train_dataset(data, **kw))
  for _ in range(4):
    next(it)
  resumed = iter(batching.train_dataset(data, **kw))
  resumed.set_state(json.loads(json.dumps(it.get_state())))
  for want in reference[4:]:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_pack_reads_parquet(tmp_path, tok, capsys):
  path = write_parquet(tmp_path / "p.parquet", conversation_rows())
  out = str(tmp_path / "packed")
  stats = pack.main(["--input", path, "--output", out, "--pack_size", "192",
                     "--tokenizer_path", os.path.dirname(tok.path), "--template", "auto"])
  capsys.readouterr()
  assert stats["pairs"] == 12
  packed = pipeline.PreferenceData(out, tok, pipeline.DataOptions(
      max_seq_length=96, template="auto", packing="first_fit_decreasing", pack_size=192))
  direct = pipeline.PreferenceData(path, tok, OPTS)
  for i in range(len(packed)):
    line = packed.line(i)
    j = next(j for j in range(len(direct)) if direct.line(j) == line)
    np.testing.assert_array_equal(packed[i]["chosen"], direct[j]["chosen"])
    assert packed[i]["prompt_len"] == direct[j]["prompt_len"]


def test_layouts_and_shapes(tmp_path):
  os.makedirs(tmp_path / "dd")
  (tmp_path / "dd" / "dataset_dict.json").write_text('{"splits": ["train"]}')
  with pytest.raises(DataError, match="DatasetDict"):
    ArrowSource(str(tmp_path / "dd"))
  src = ArrowSource(write_parquet(tmp_path / "a.parquet", conversation_rows(2)))
  assert src.format == "trl" and len(src) == 2
  # An explicit prompt (TRL), and H4's ultrafeedback_binarized: a string prompt beside whole
  # conversations (the conversations' shared prefix is the prompt).
  convo = conversation_rows(1)[0]
  h4 = validate_record(dict(convo, prompt="Question 0?"), "f", 1, "trl")
  explicit = validate_record({"prompt": convo["chosen"][:-1], "chosen": convo["chosen"][-1:],
                              "rejected": convo["rejected"][-1:]}, "f", 1, "trl")
  for r in (h4, explicit):
    assert r["prompt"] == convo["chosen"][:-1] and r["chosen"] == "The answer is 0."
  assert h4["chosen_reward"] == 8.0 and explicit["chosen_reward"] is None
  with pytest.raises(DataError, match=r"f:1: field 'rejected': shares no messages"):
    validate_record({"chosen": convo["chosen"], "rejected": [{"role": "user", "content": "x"},
                                                           {"role": "assistant", "content": "y"}]},
                    "f", 1, "trl")


@pytest.mark.slow
def test_training_run_on_parquet_with_the_checkpoint_template(tmp_path, tok):
  """The wiring end to end (README's command, shrunk): tokenizer.json folder, template=auto,
  conversational Parquet; the run starts at ln 2 and records what it read."""
  config = tiny_config()
  config.model.vocab_size = 512
  config.data.tokenizer_path = os.path.dirname(tok.path)
  config.data.template = "auto"
  config.data.max_seq_length = 96
  config.data.train_path = write_parquet(tmp_path / "train.parquet", conversation_rows(16))
  config.data.val_path = write_save_to_disk(tmp_path / "val", conversation_rows(4))
  config.train.max_steps = 2
  loop.run(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(l) for l in f]
  first = next(r for r in records if r["split"] == "train")
  assert first["loss"] == pytest.approx(np.log(2), abs=1e-3)
  assert [r["step"] for r in records if r["split"] == "train"] == [1, 2]
