"""KTO's unpaired data: the kto format (JSONL, Parquet, save_to_disk; string and chat), its
errors, `data.unpair`, TRL's KL completions, and packed = padded per-example log-probs."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from dpojax import config as config_lib
from dpojax import model as model_lib
from dpojax.data import batching, pipeline, unpaired
from dpojax.data.sources import DataError, RecordError
from dpojax.data.tokenize import Tokenizer, tokenize_pair
from dpojax.train import build as build_lib
from dpojax.train import logps as logps_lib
from dpojax.train import step as step_lib

from conftest import ROOT, tiny_config
from test_packing import packed_batch

TOKENIZER = os.path.join(ROOT, "dpojax", "assets", "tokenizer.model")
VAL = os.path.join(ROOT, "dpojax", "assets", "toy_prefs_val.jsonl")
EXAMPLES = [
    {"prompt": "Count from 1 to 3.", "completion": "1 2 3", "label": True},
    {"prompt": "Tell me about cats.", "completion": "Go away.", "label": False},
    {"prompt": "Count from 4 to 6.", "completion": "4 5 6", "label": True},
    {"prompt": [{"role": "user", "content": "Hi there."}],
     "completion": [{"role": "assistant", "content": "Hello! Happy to help."}], "label": True},
    {"prompt": "Tell me about dogs.", "completion": "Dogs are loyal.", "label": True},
]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOKENIZER)


def write_jsonl(path, records):
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  return str(path)


def opts(**kw):
  return pipeline.DataOptions(max_seq_length=256, template="chatml", kl_chunk=3, **kw)


def test_kl_partner_rotates_by_one_within_chunks():
  # TRL: [completion_ids[-1]] + completion_ids[:-1] per batch of `chunk` examples.
  assert [unpaired.kl_partner(i, 7, 3) for i in range(7)] == [2, 0, 1, 5, 3, 4, 6]
  assert [unpaired.kl_partner(i, 4, 4) for i in range(4)] == [3, 0, 1, 2]


def test_kto_jsonl_examples_with_kl_sequences(tmp_path, tok):
  data = pipeline.PreferenceData(write_jsonl(tmp_path / "kto.jsonl", EXAMPLES), tok, opts())
  assert data.stats["format"] == "kto" and len(data) == 5
  for i, example in enumerate(EXAMPLES):
    j = unpaired.kl_partner(i, 5, 3)
    record = {"prompt": example["prompt"], "chosen": EXAMPLES[i]["completion"],
              "rejected": EXAMPLES[j]["completion"]}
    if isinstance(record["prompt"], str):
      record["prompt"] = [{"role": "user", "content": record["prompt"]}]
    for side in ("chosen", "rejected"):
      if isinstance(record[side], list):
        record[side] = record[side][0]["content"]
    want = tokenize_pair(record, tok, template="chatml")
    got = data[i]
    np.testing.assert_array_equal(got["chosen"], want["chosen"])  # x_i + y_i.
    np.testing.assert_array_equal(got["rejected"], want["rejected"])  # x_i + y_partner.
    assert got["prompt_len"] == want["prompt_len"]
    assert got["chosen_reward"] == float(example["label"])
  batch = batching.collate([data[i] for i in range(4)], micro_batch_size=4, seq_len=256,
                           opts=data.opts)
  np.testing.assert_array_equal(batch["chosen_reward"][0], [1, 0, 1, 1])  # The labels.


@pytest.mark.parametrize("change,message", [
    ({"label": "yes"}, r"kto.jsonl:2: field 'label': expected true or false, got 'yes'"),
    ({"label": None}, r"kto.jsonl:2: field 'label': expected true or false, got None"),
    ({"completion": ""}, r"kto.jsonl:2: field 'completion': empty response"),
    ({"completion": [{"role": "user", "content": "x"}]},
     r"kto.jsonl:2: field 'completion\[0\].role': expected one of \['assistant'\]"),
    ({"prompt": 3}, r"kto.jsonl:2: field 'prompt': expected a string or a message list"),
])
def test_bad_examples_name_file_line_and_field(tmp_path, tok, change, message):
  records = [dict(EXAMPLES[0]), dict(EXAMPLES[1], **change)] + EXAMPLES[2:]
  with pytest.raises(RecordError, match=message):
    pipeline.PreferenceData(write_jsonl(tmp_path / "kto.jsonl", records), tok, opts())


def test_formats_and_losses_must_agree(tmp_path, tok):
  kto = write_jsonl(tmp_path / "kto.jsonl", EXAMPLES)
  with pytest.raises(DataError, match="need an unpaired loss: dpo.preference_loss=kto"):
    pipeline.PreferenceData(kto, tok, pipeline.DataOptions(max_seq_length=64))
  with pytest.raises(DataError, match=r"toy_prefs_val.jsonl:1: paired records \(nemo\) for an "
                                      r"unpaired loss .* set data.unpair=True"):
    pipeline.PreferenceData(VAL, tok, opts())
  with pytest.raises(DataError, match="data.unpair=True, but the file is already unpaired"):
    pipeline.PreferenceData(kto, tok, opts(unpair=True))


def test_unpair_splits_pairs_as_trl(tok):
  """TRL's unpair_preference_dataset: per block of pairs, the chosen (True) then the rejected
  (False); both examples of a pair keep its line."""
  paired = pipeline.PreferenceData(VAL, tok, pipeline.DataOptions(max_seq_length=64))
  data = pipeline.PreferenceData(VAL, tok, opts(unpair=True))
  n = len(paired.source)
  assert len(data.source) == 2 * n and n < unpaired.UNPAIR_BLOCK
  for i in (0, 1, n - 1):
    pair = paired.source[i]
    good, bad = data.source.example(i), data.source.example(n + i)
    assert (good["completion"], good["label"]) == (pair["chosen"], True)
    assert (bad["completion"], bad["label"]) == (pair["rejected"], False)
    assert data.source.line_number(n + i) == data.source.line_number(i) == i + 1


def test_parquet_and_save_to_disk_kto_sources(tmp_path, tok):
  rows = [dict(e, prompt=e["prompt"] if isinstance(e["prompt"], str) else "Hi there.",
               completion=e["completion"] if isinstance(e["completion"], str) else "Hello!")
          for e in EXAMPLES]
  table = pa.Table.from_pylist(rows)
  pq.write_table(table, tmp_path / "kto.parquet")
  folder = tmp_path / "disk"
  folder.mkdir()
  with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
    with pa.ipc.new_stream(sink, table.schema) as writer:
      writer.write_table(table)
  (folder / "state.json").write_text(json.dumps(
      {"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
  jsonl = pipeline.PreferenceData(write_jsonl(tmp_path / "kto.jsonl", rows), tok, opts())
  for path in (tmp_path / "kto.parquet", folder):
    data = pipeline.PreferenceData(str(path), tok, opts())
    assert data.stats["format"] == "kto"
    for i in range(len(rows)):
      np.testing.assert_array_equal(data[i]["rejected"], jsonl[i]["rejected"])
  bad = pa.Table.from_pylist([rows[0], dict(rows[1], label=None)])
  pq.write_table(bad, tmp_path / "bad.parquet")
  with pytest.raises(RecordError, match=r"bad.parquet:row 1: column 'label': missing"):
    pipeline.PreferenceData(str(tmp_path / "bad.parquet"), tok, opts())


def test_kto_run_config_builds_unpaired_data(tmp_path):
  config = tiny_config()
  config.dpo.preference_loss = "kto"
  config.data.unpair = True
  _, train, val, step_cfg = build_lib.build(config)
  assert train.opts.kl_chunk == config.train.micro_batch_size
  assert len(train) == 2 * len(train.source.inner) - train.dropped
  assert step_cfg.reference == "copy"
  # The labels are counted for TRL's weight advice: one desirable example per kept chosen.
  kept = [train.source.example(int(i))["label"] for i in train.indices]
  assert train.stats["desirable"] == sum(kept) > 0


@pytest.mark.parametrize("share_prompt", [False, True])
def test_packed_and_padded_give_the_same_example_logps(tok, share_prompt):
  """KTO rows packed (each example beside its KL sequence; with data.share_prompt, the two
  branch off one prompt) = padded, per example, in float64: both sequences' log-probs, the
  loss and the metrics."""
  data = pipeline.PreferenceData(VAL, tok, pipeline.DataOptions(
      max_seq_length=48, kl_chunk=4, unpair=True))
  examples = [data[i] for i in list(range(6)) + list(range(len(data) - 6, len(data)))]
  n = len(examples)
  cfg = step_lib.StepConfig(model=model_lib.ModelConfig(
      vocab_size=384, hidden_size=32, num_layers=1, num_attention_heads=4, num_query_groups=2,
      ffn_hidden_size=64, dtype="float64", param_dtype="float64"),
      loss=config_lib.LossConfig(losses=("kto",), weights=(1.0,), beta=1.0), logprob_impl="xla")
  with jax.enable_x64(True):
    shapes = jax.eval_shape(lambda k: model_lib.init_params(cfg.model, k), jax.random.key(0))
  rng = np.random.default_rng(0)
  draw = lambda s: rng.normal(0.0, 0.3, s.shape)
  params, ref_params = jax.tree.map(draw, shapes), jax.tree.map(draw, shapes)

  @jax.jit
  def step(micro):
    return (logps_lib.sequence_logps(params, micro, cfg),
            step_lib.micro_loss(params, ref_params, micro, cfg, {"pairs": np.float64(n)}))

  def run(batch):
    with jax.enable_x64(True):
      return jax.device_get(step({k: jnp.asarray(v[0]) for k, v in batch.items()}))

  padded = batching.collate(examples, micro_batch_size=n, seq_len=48, opts=data.opts)
  packed, slots = packed_batch(examples, 96, 1, share_prompt)
  assert packed["tokens"].shape[1] < n
  (want, (want_loss, want_m)), (got, (got_loss, got_m)) = run(padded), run(packed)
  assert np.abs(want["logps"]).min() > 1.0
  np.testing.assert_allclose(got["logps"][slots], want["logps"], rtol=0, atol=1e-9)
  np.testing.assert_array_equal(got["counts"][slots], want["counts"])
  np.testing.assert_allclose(float(got_loss), float(want_loss), rtol=1e-12)
  for key in ("loss", "_kl_sum", "_rewards_desirable", "_rewards_undesirable",
              "num_desirable", "num_undesirable"):
    np.testing.assert_allclose(got_m[key], want_m[key], rtol=1e-10, atol=1e-10, err_msg=key)
  assert want_m["num_desirable"] == 6 and want_m["num_undesirable"] == 6
