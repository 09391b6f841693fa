import gzip
import io
import json
import logging
import os

import numpy as np
import pytest
import sentencepiece as spm

from dpojax import pack as pack_cli
from dpojax.data import batching, packed_dir, packing, pipeline, templates
from dpojax.data.sources import DataError, JsonlSource
from dpojax.data.tokenize import Tokenizer, fit_pair, tokenize_pair

from conftest import ROOT, TESTDATA, load_default_config

TOKENIZER = os.path.join(ROOT, "dpojax", "assets", "tokenizer.model")
HH_SLICE = os.path.join(TESTDATA, "hh-rlhf", "harmless-base-test-slice.jsonl.gz")
GOOD = {"prompt": "Count from 1 to 4.", "chosen_response": "1 2 3 4",
        "rejected_response": "4 3 2 1"}
OPTS = pipeline.DataOptions(max_seq_length=32)
MARKERS = ["<extra_id_0>", "<extra_id_1>", "<|im_start|>", "<|im_end|>"]


@pytest.fixture(scope="module")
def tok():
  return Tokenizer(TOKENIZER)


@pytest.fixture(scope="module")
def marker_tok(tmp_path_factory):
  """A SentencePiece model with the template markers as pieces; decodes text exactly."""
  model = io.BytesIO()
  sentences = ["Hello there, how are you today?", "The quick brown fox jumps over the dog.",
               "System User Assistant INST SYS", "Count from 1 to 4. 1 2 3 4"] * 20
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=320,
      hard_vocab_limit=False, user_defined_symbols=MARKERS, add_dummy_prefix=False,
      normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=True,
      minloglevel=2)
  path = tmp_path_factory.mktemp("spm") / "markers.model"
  path.write_bytes(model.getvalue())
  return Tokenizer(str(path))


def write_lines(tmp_path, lines, name="data.jsonl"):
  path = tmp_path / name
  path.write_text("".join(l + "\n" for l in lines))
  return str(path)


# --- validation ----------------------------------------------------------------------------
NEMO_BAD = [
    ('{"prompt": "x", "chosen_response": "a", ', None, "invalid JSON"),
    ('["a", "b"]', None, "expected a JSON object, got list"),
    ('{"prompt": "x", "rejected_response": "b"}', "chosen_response", "missing"),
    ('{"chosen_response": "a", "rejected_response": "b"}', "prompt", "missing"),
    ('{"prompt": 3, "chosen_response": "a", "rejected_response": "b"}', "prompt",
     "expected a string or a message list, got int"),
    ('{"prompt": "x", "chosen_response": ["a"], "rejected_response": "b"}',
     "chosen_response[0]", "expected a message object, got str"),
    ('{"prompt": "x", "chosen_response": 7, "rejected_response": "b"}', "chosen_response",
     "expected a string, got int"),
    ('{"prompt": "  ", "chosen_response": "a", "rejected_response": "b"}', "prompt",
     "empty prompt"),
    ('{"prompt": "x", "chosen_response": "a", "rejected_response": "  "}', "rejected_response",
     "empty response"),
    ('{"prompt": [], "chosen_response": "a", "rejected_response": "b"}', "prompt",
     "empty message list"),
    ('{"prompt": [{"role": "robot", "content": "x"}], "chosen_response": "a", '
     '"rejected_response": "b"}', "prompt[0].role",
     "expected one of ['system', 'user', 'assistant'], got 'robot'"),
    ('{"prompt": [{"role": "user", "content": 5}], "chosen_response": "a", '
     '"rejected_response": "b"}', "prompt[0].content", "expected a string, got int"),
    ('{"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], '
     '"chosen_response": "a", "rejected_response": "b"}', "prompt",
     "the last prompt message must have role 'user'"),
    ('{"prompt": "x", "chosen_response": "a", "rejected_response": "b", "chosen_reward": "hi"}',
     "chosen_reward", "expected a finite number, got 'hi'"),
    ('{"prompt": "x", "chosen_response": "a", "rejected_response": "b", '
     '"rejected_reward": true}', "rejected_reward", "expected a finite number, got True"),
    ('{"prompt": "x", "chosen_response": "a", "rejected_response": "b", '
     '"chosen_reward": NaN}', "chosen_reward", "expected a finite number, got nan"),
    ('{"prompt": "x", "chosen_response": "same", "rejected_response": "same"}',
     "rejected_response", "identical to 'chosen_response'"),
    # The toy tokenizer folds runs of spaces: different strings, identical tokens.
    ('{"prompt": "x", "chosen_response": "a  b", "rejected_response": "a b"}', "rejected",
     "chosen and rejected have identical tokens"),
]


@pytest.mark.parametrize("bad_line,field,problem", NEMO_BAD)
def test_malformed_lines_name_file_line_and_field(tmp_path, tok, bad_line, field, problem):
  # Line 3 is bad; a blank line 2 must not shift the reported line number.
  path = write_lines(tmp_path, [json.dumps(GOOD), "", bad_line, json.dumps(GOOD)])
  with pytest.raises(DataError) as e:
    pipeline.PreferenceData(path, tok, OPTS)
  message = str(e.value)
  assert message.startswith(f"{path}:3")
  assert problem in message
  if field:
    assert message.startswith(f"{path}:3: field '{field}': ")


TRL_GOOD = {"prompt": "Count from 1 to 4.", "chosen": "1 2 3 4", "rejected": "4 3 2 1"}
OTHER_BAD = [
    (TRL_GOOD, '{"prompt": "x", "chosen": [{"role": "assistant", "content": "a"}, '
     '{"role": "assistant", "content": "b"}], "rejected": "c"}', "chosen",
     "expected one assistant message, got 2"),
    (TRL_GOOD, '{"prompt": "x", "chosen": [{"role": "user", "content": "a"}], '
     '"rejected": "c"}', "chosen[0].role", "expected one of ['assistant'], got 'user'"),
    (TRL_GOOD, '{"prompt": "x", "chosen": "a"}', "rejected", "missing"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
     '{"chosen": "\\n\\nHuman: hi", "rejected": "\\n\\nHuman: hi\\n\\nAssistant: go"}', "chosen",
     "no '\\n\\nAssistant:' turn in the dialogue"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
     '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", '
     '"rejected": "\\n\\nHuman: ho\\n\\nAssistant: b"}', "rejected",
     "the dialogue before the last '\\n\\nAssistant:' differs from the chosen one"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
     '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant:  ", '
     '"rejected": "\\n\\nHuman: hi\\n\\nAssistant: b"}', "chosen",
     "empty response after the last '\\n\\nAssistant:'"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"},
     '{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: a", '
     '"rejected": "\\n\\nHuman: hi\\n\\nAssistant: a"}', "rejected",
     "identical to 'chosen'"),
]


@pytest.mark.parametrize("good,bad_line,field,problem", OTHER_BAD)
def test_trl_and_hh_validation_messages(tmp_path, tok, good, bad_line, field, problem):
  path = write_lines(tmp_path, [json.dumps(good), bad_line])
  with pytest.raises(DataError) as e:
    pipeline.PreferenceData(path, tok, OPTS)
  assert str(e.value).startswith(f"{path}:2: field '{field}': ")
  assert problem in str(e.value)


def test_on_error_skip_counts_and_summarises(tmp_path, tok, caplog):
  bad = [line for line, _, _ in NEMO_BAD]
  path = write_lines(tmp_path, [json.dumps(GOOD)] + bad + [json.dumps(GOOD)])
  opts = pipeline.DataOptions(max_seq_length=32, on_error="skip")
  with caplog.at_level(logging.WARNING):
    data = pipeline.PreferenceData(path, tok, opts)
  assert len(data) == 2 and data.stats["skipped"] == len(NEMO_BAD)
  assert data.stats["skipped_by_reason"] == {
      "invalid JSON": 1, "not an object": 1, "missing field": 2, "wrong type": 6,
      "empty field": 3, "bad reward": 3, "chosen equals rejected": 2}
  assert f"data.on_error=skip skipped {len(NEMO_BAD)} of {len(NEMO_BAD) + 2} records" in (
      caplog.text)
  assert f"invalid JSON: 1 (first: {path}:2: invalid JSON" in caplog.text
  assert [data[i]["line"] for i in range(2)] == [1, len(NEMO_BAD) + 2]
  # `line` (the non-finite log line's source) skips the skipped records without reading them.
  assert [data.line(i) for i in range(2)] == [1, len(NEMO_BAD) + 2]
  assert data.source_path == path


def test_fewer_pairs_than_global_batch_is_a_clear_error(tmp_path, tok):
  path = write_lines(tmp_path, [json.dumps(GOOD)] * 3)
  data = pipeline.PreferenceData(path, tok, OPTS)
  with pytest.raises(DataError, match=r"3 usable pairs .* fewer than train.global_batch_size=4"):
    batching.train_dataset(data, global_batch_size=4, micro_batch_size=2, seed=0)


def test_missing_files_and_bad_options_are_named(tmp_path):
  with pytest.raises(DataError, match="nope.jsonl: no such data file"):
    JsonlSource(str(tmp_path / "nope.jsonl"))
  with pytest.raises(DataError, match="tokenizer model file not found"):
    Tokenizer(str(tmp_path / "nope.model"))
  with pytest.raises(DataError, match=r"data.template='alpaca' is not one of \('plain', "):
    pipeline.DataOptions(max_seq_length=8, template="alpaca")
  with pytest.raises(DataError, match="data.truncation='cut' is not one of"):
    pipeline.DataOptions(max_seq_length=8, truncation="cut")
  with pytest.raises(DataError, match="data.on_error='ignore' is not one of"):
    pipeline.DataOptions(max_seq_length=8, on_error="ignore")
  with pytest.raises(DataError, match=r"data.pack_size=100 is smaller than 2 x "
                     r"data.max_seq_length=64"):
    pipeline.DataOptions(max_seq_length=64, packing="first_fit_decreasing", pack_size=100)


# --- sources and formats -------------------------------------------------------------------
def test_source_is_random_access_by_offset(tmp_path):
  rows = [dict(GOOD, prompt=f"p{i}") for i in range(5)]
  path = write_lines(tmp_path, [json.dumps(r) for r in rows[:2]] + [""] +
                     [json.dumps(r) for r in rows[2:]])
  src = JsonlSource(path)
  assert len(src) == 5 and src.format == "nemo"
  assert src[3]["prompt"] == "p3" and src[3]["line"] == 5
  assert src[0]["chosen"] == "1 2 3 4" and src[0]["rejected"] == "4 3 2 1"


def test_gzip_source_decompresses_once_to_the_cache(tmp_path):
  rows = [dict(TRL_GOOD, prompt=f"p{i}") for i in range(4)]
  path = tmp_path / "d.jsonl.gz"
  with gzip.open(path, "wt") as f:
    f.write("\n".join(json.dumps(r) for r in rows[:2]) + "\n\n" +
            "\n".join(json.dumps(r) for r in rows[2:]) + "\n")
  cache = tmp_path / "cache"
  src = JsonlSource(str(path), cache_dir=str(cache))
  assert src.format == "trl" and len(src) == 4
  assert src[2]["prompt"] == "p2" and src[2]["line"] == 4
  (cached,) = os.listdir(cache)
  assert cached.endswith("-d.jsonl")
  mtime = os.stat(cache / cached).st_mtime_ns
  assert JsonlSource(str(path), cache_dir=str(cache))[3]["prompt"] == "p3"
  assert os.listdir(cache) == [cached] and os.stat(cache / cached).st_mtime_ns == mtime


def test_format_detection_and_normalization(tmp_path):
  messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}]
  trl_chat = {"prompt": messages, "chosen": [{"role": "assistant", "content": "Hello."}],
              "rejected": [{"role": "assistant", "content": "Go away."}]}
  path = write_lines(tmp_path, [json.dumps(trl_chat)], "chat.jsonl")
  record = JsonlSource(path)[0]
  assert (record["prompt"], record["chosen"], record["rejected"]) == (
      messages, "Hello.", "Go away.")
  nemo_chat = {"prompt": messages, "chosen_response": {"role": "assistant", "content": "Hi."},
               "rejected_response": "No.", "chosen_reward": 2, "rejected_reward": -1.5}
  record = JsonlSource(write_lines(tmp_path, [json.dumps(nemo_chat)], "nemo.jsonl"))[0]
  assert (record["chosen"], record["chosen_reward"], record["rejected_reward"]) == (
      "Hi.", 2.0, -1.5)
  hh = {"chosen": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: good",
        "rejected": "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: bad"}
  src = JsonlSource(write_lines(tmp_path, ["not json", json.dumps(hh)], "hh.jsonl"))
  assert src.format == "hh-rlhf"  # Detected past an invalid first line.
  record = src[1]
  assert record["prompt"] == "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
  assert (record["chosen"], record["rejected"]) == (" good", " bad")
  with pytest.raises(DataError, match=r"cannot detect data.format .* set data.format"):
    JsonlSource(write_lines(tmp_path, ['{"question": "x"}'], "q.jsonl"))
  # An explicit format overrides detection.
  assert JsonlSource(path, fmt="trl").format == "trl"


def test_hh_rlhf_slice(tmp_path, tok):
  """Real HH-RLHF lines (gzipped): the two bad ones are named, or skipped and counted."""
  cache = str(tmp_path / "cache")
  with pytest.raises(DataError) as e:
    pipeline.PreferenceData(HH_SLICE, tok, pipeline.DataOptions(max_seq_length=4096,
                                                                cache_dir=cache))
  assert str(e.value).startswith(f"{HH_SLICE}:87: field 'chosen': empty response after")
  opts = pipeline.DataOptions(max_seq_length=4096, on_error="skip", cache_dir=cache)
  data = pipeline.PreferenceData(HH_SLICE, tok, opts)
  assert data.stats["format"] == "hh-rlhf" and len(data) == 99
  assert data.stats["skipped_by_reason"] == {"empty field": 1, "prompts differ": 1}
  record = data.source[0]
  assert record["prompt"].endswith("\n\nAssistant:") and record["prompt"].startswith(
      "\n\nHuman: what are some pranks with a pen")
  assert record["chosen"].startswith(" Sure") or record["chosen"].startswith(" No")
  # Chat templates split the dialogue into turns.
  turns = templates.split_dialogue(record["prompt"])
  assert [m["role"] for m in turns] == ["user", "assistant", "user", "assistant", "user"]
  assert turns[0]["content"] == "what are some pranks with a pen i can do?"


# --- templates and tokenization ------------------------------------------------------------
def test_apart_tokenization_keeps_the_prompt_an_exact_prefix(tok):
  # data.boundary=apart: "4." + "1 2 3 4" each alone; the response starts a word ("\u25811").
  pair = tokenize_pair(dict(prompt=GOOD["prompt"], chosen=GOOD["chosen_response"],
                            rejected=GOOD["rejected_response"]), tok, boundary="apart")
  prompt_ids = [tok.bos_id] + tok.encode(GOOD["prompt"])
  assert pair["prompt_len"] == len(prompt_ids)
  for side, text in (("chosen", "1 2 3 4"), ("rejected", "4 3 2 1")):
    np.testing.assert_array_equal(pair[side], prompt_ids + tok.encode(text) + [tok.eos_id])
  # At a word boundary the dummy-prefix space stands for the response's leading space, so
  # the result equals joint tokenization (HH-RLHF's "Assistant:" + " Sure ...").
  record = {"prompt": "Hello there.\n\nAssistant:", "chosen": " Sure thing.",
            "rejected": " No thanks.", "dialogue": False}
  for boundary in ("apart", "joint"):
    pair = tokenize_pair(record, tok, add_bos=False, append_eos=False, boundary=boundary)
    for side in ("chosen", "rejected"):
      assert pair[side].tolist() == tok.encode(record["prompt"] + record[side])


def test_joint_tokenization_has_no_extra_word_start_piece(tok):
  # The case: a response that starts with "," gets a lone "\u2581" piece alone.
  record = {"prompt": "Count from 1 to 4", "chosen": ', "Let\'s go"', "rejected": ". No.",
            "dialogue": False}
  apart = tokenize_pair(record, tok, boundary="apart")
  joint = tokenize_pair(record, tok)
  p = joint["prompt_len"]
  assert p == apart["prompt_len"] == 1 + len(tok.encode(record["prompt"]))
  for side in ("chosen", "rejected"):
    assert joint[side].tolist() == ([tok.bos_id] + tok.encode(record["prompt"] + record[side])
                                    + [tok.eos_id])
    assert tok.sp.id_to_piece(int(apart[side][p])) == "\u2581"  # What it fixes.
    assert tok.sp.id_to_piece(int(joint[side][p])) != "\u2581"
  assert joint["straddled"] == 0
  with pytest.raises(ValueError, match="data.boundary='both' is not one of"):
    tokenize_pair(record, tok, boundary="both")


def _straddle_tokenizer(tmp_path_factory):
  """A model with the piece ".1", so that "4." + "1 2" straddles the boundary jointly."""
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(["Count from 1 to 4.1 2 3 4", "4.1 4.1 4.1 .1 .1"] * 20),
      model_writer=model, vocab_size=300, hard_vocab_limit=False, user_defined_symbols=[".1"],
      byte_fallback=True, minloglevel=2)
  path = tmp_path_factory.mktemp("spm_straddle") / "straddle.model"
  path.write_bytes(model.getvalue())
  return Tokenizer(str(path))


def test_a_piece_across_the_boundary_falls_back_to_apart(tmp_path_factory):
  tok = _straddle_tokenizer(tmp_path_factory)
  record = {"prompt": "Count from 1 to 4.", "chosen": "1 2 3 4", "rejected": " 4 3 2 1",
            "dialogue": False}
  joint_text = tok.encode(record["prompt"] + record["chosen"])
  prompt_ids = tok.encode(record["prompt"])
  assert joint_text[:len(prompt_ids)] != prompt_ids  # ".1" straddles: no exact prefix.
  pair = tokenize_pair(record, tok, add_bos=False, append_eos=False)
  apart = tokenize_pair(record, tok, add_bos=False, append_eos=False, boundary="apart")
  assert pair["straddled"] == 1 and pair["prompt_len"] == len(prompt_ids)
  assert pair["chosen"].tolist() == apart["chosen"].tolist() == prompt_ids + tok.encode("1 2 3 4")
  assert pair["rejected"].tolist() == tok.encode(record["prompt"] + record["rejected"])


def _joint_reference_check(path, tok, cache_dir, max_seq_length=1 << 20):
  """Every pair against [BOS] + sp.encode(prompt + response) + [EOS] under the plain template:
  equal unless that side straddles, which must be exactly the sides where the joint ids do
  not start with the prompt's. Returns (pairs, pairs apart differs, straddled pairs)."""
  opts = pipeline.DataOptions(max_seq_length=max_seq_length, on_error="skip", cache_dir=cache_dir)
  data = pipeline.PreferenceData(path, tok, opts)
  apart_differs = straddled = 0
  for k in range(len(data)):
    record = data.source[int(data.indices[k])]
    (prompt,), responses = templates.render(record, "plain")
    pair, prompt_ids = data[k], [tok.bos_id] + tok.encode(prompt)
    apart = tokenize_pair(record, tok, boundary="apart")
    sides, differs = 0, False
    for side in ("chosen", "rejected"):
      reference = [tok.bos_id] + tok.encode(prompt + responses[side][0]) + [tok.eos_id]
      assert pair[side][:pair["prompt_len"]].tolist() == prompt_ids
      if reference[:len(prompt_ids)] == prompt_ids:
        assert pair[side].tolist() == reference, (path, record["line"], side)
      else:
        sides += 1
        assert pair[side].tolist() == apart[side].tolist()
      differs |= apart[side].tolist() != reference
    assert pair["straddled"] == sides
    straddled += sides > 0
    apart_differs += differs
  assert data.stats["straddled"] == straddled
  return len(data), apart_differs, straddled


def test_joint_boundary_equals_encode_of_prompt_plus_response(tok, tmp_path):
  """The toy data (responses with no leading space: every pair changed), the HH-RLHF slice
  (responses after one space: none changed), with the toy and the stories260K tokenizers."""
  stories = Tokenizer(os.path.join(TESTDATA, "stories260k", "hf", "tokenizer.model"))
  toy = os.path.join(ROOT, "dpojax", "assets", "toy_prefs_val.jsonl")
  assert _joint_reference_check(toy, tok, str(tmp_path)) == (200, 200, 0)
  assert _joint_reference_check(toy, stories, str(tmp_path)) == (200, 200, 0)
  assert _joint_reference_check(HH_SLICE, tok, str(tmp_path)) == (99, 0, 0)
  assert _joint_reference_check(HH_SLICE, stories, str(tmp_path)) == (99, 0, 0)


def test_data_options_from_an_old_run_config_tokenize_apart():
  import ml_collections  # pylint: disable=g-import-not-at-top
  old = ml_collections.ConfigDict({"max_seq_length": 16, "template": "plain"})
  assert pipeline.DataOptions.from_config(old).boundary == "apart"
  new = ml_collections.ConfigDict({"max_seq_length": 16, "boundary": "joint"})
  assert pipeline.DataOptions.from_config(new).boundary == "joint"
  assert pipeline.DataOptions.from_config(new).shuffle  # Absent: its default.
  with pytest.raises(DataError, match="data.boundary='x' is not one of"):
    pipeline.DataOptions(max_seq_length=16, boundary="x")


def test_templates_render_as_documented(marker_tok):
  tok = marker_tok
  ids = lambda m: tok.sp.piece_to_id(m)
  record = {"prompt": [{"role": "system", "content": "Be kind."},
                       {"role": "user", "content": "Hi?"}],
            "chosen": "Hello.", "rejected": "No.", "dialogue": False}
  decode = lambda x: tok.sp.decode([int(i) for i in x])

  pair = tokenize_pair(record, tok, template="nemo", add_bos=False, append_eos=False)
  p = pair["prompt_len"]
  assert decode(pair["chosen"][:p]) == (
      "<extra_id_0>System\nBe kind.\n<extra_id_1>User\nHi?\n<extra_id_1>Assistant\n")
  assert decode(pair["chosen"][p:]) == "Hello.\n<extra_id_1>"
  # Markers are single pieces; the docs' default (no system message) renders "System\n\n".
  assert pair["chosen"][:p].tolist().count(ids("<extra_id_1>")) == 2
  assert pair["chosen"][p:].tolist()[-1] == ids("<extra_id_1>")
  plain_q = dict(record, prompt="Q")
  pair = tokenize_pair(plain_q, tok, template="nemo", add_bos=False, append_eos=False)
  assert decode(pair["chosen"][:pair["prompt_len"]]) == (
      "<extra_id_0>System\n\n<extra_id_1>User\nQ\n<extra_id_1>Assistant\n")

  pair = tokenize_pair(record, tok, template="chatml", add_bos=False, append_eos=True)
  p = pair["prompt_len"]
  assert decode(pair["chosen"][:p]) == (
      "<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n"
      "<|im_start|>assistant\n")
  assert pair["rejected"][p:].tolist() == tok.encode("No.") + [ids("<|im_end|>"), tok.eos_id]

  turns = {"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "q1"},
                      {"role": "assistant", "content": "a1"},
                      {"role": "user", "content": "q2"}],
           "chosen": "yes", "rejected": "no", "dialogue": False}
  pair = tokenize_pair(turns, tok, template="llama2", add_bos=True, append_eos=True)
  expected = ([tok.bos_id] + tok.encode("[INST] <<SYS>>\nS\n<</SYS>>\n\nq1 [/INST]") +
              tok.encode(" a1 ") + [tok.eos_id, tok.bos_id] + tok.encode("[INST] q2 [/INST]"))
  assert pair["chosen"][:pair["prompt_len"]].tolist() == expected
  assert pair["chosen"][pair["prompt_len"]:].tolist() == tok.encode(" yes ") + [tok.eos_id]

  # plain renders chat messages in the HH-RLHF style.
  injected = dict(turns, prompt=[{"role": "user", "content": "<|im_end|>"}])
  pair = tokenize_pair(injected, tok, template="plain", add_bos=False, append_eos=False)
  p = pair["prompt_len"]
  assert decode(pair["chosen"][:p]) == "\n\nHuman: <|im_end|>\n\nAssistant:"
  assert decode(pair["chosen"][p:]) == " yes"  # No dummy prefix here: the space is kept.


def test_hh_dialogue_under_a_chat_template(marker_tok):
  record = {"prompt": "\n\nHuman: a?\n\nAssistant: b.\n\nHuman: c?\n\nAssistant:",
            "chosen": " yes", "rejected": " no", "dialogue": True}
  pair = tokenize_pair(record, marker_tok, template="chatml", add_bos=False, append_eos=False)
  assert marker_tok.sp.decode(pair["chosen"].tolist()) == (
      "<|im_start|>user\na?<|im_end|>\n<|im_start|>assistant\nb.<|im_end|>\n"
      "<|im_start|>user\nc?<|im_end|>\n<|im_start|>assistant\nyes<|im_end|>")


# --- lengths -------------------------------------------------------------------------------
def test_truncation_modes():
  pair = {"chosen": np.arange(1, 11, dtype=np.int32),
          "rejected": np.array([1, 2, 3, 4, 5, 20, 21, 22], np.int32),
          "prompt_len": 5, "line": 1, "chosen_reward": None, "rejected_reward": None}
  assert fit_pair(pair, 10, "drop") == (pair, "ok")
  assert fit_pair(pair, 9, "drop") == (None, "too long")
  out, status = fit_pair(pair, 8, "truncate_prompt_left", keep_prefix=1)
  assert status == "truncated" and out["prompt_len"] == 3
  assert out["chosen"].tolist() == [1, 4, 5, 6, 7, 8, 9, 10]  # BOS kept, 2 prompt tokens cut.
  assert out["rejected"].tolist() == [1, 4, 5, 20, 21, 22]
  out, _ = fit_pair(pair, 8, "truncate_prompt_left", keep_prefix=0)
  assert out["chosen"].tolist() == [3, 4, 5, 6, 7, 8, 9, 10] and out["prompt_len"] == 3
  # At least one prompt token after BOS must stay.
  assert fit_pair(pair, 6, "truncate_prompt_left", keep_prefix=1) == (None, "too long")
  out, status = fit_pair(pair, 7, "truncate_response_right")
  assert status == "truncated" and out["prompt_len"] == 5
  assert out["chosen"].tolist() == [1, 2, 3, 4, 5, 6, 7]
  assert out["rejected"].tolist() == [1, 2, 3, 4, 5, 20, 21]
  assert fit_pair(pair, 5, "truncate_response_right") == (None, "too long")
  # Responses with a common start can be cut to the same tokens: dropped, never a tie.
  shared = dict(pair, rejected=np.array([1, 2, 3, 4, 5, 6, 9, 9, 9, 9, 9], np.int32))
  assert fit_pair(shared, 6, "truncate_response_right") == (None, "identical after truncation")


def test_over_long_pairs_are_dropped_or_truncated_and_counted(tmp_path, tok, caplog):
  long_response = dict(GOOD, rejected_response=" ".join(["word"] * 100))
  long_prompt = dict(GOOD, prompt=" ".join(["word"] * 100))
  path = write_lines(tmp_path, [json.dumps(GOOD), json.dumps(long_response),
                                json.dumps(long_prompt), json.dumps(GOOD)])
  data = pipeline.PreferenceData(path, tok, OPTS)
  assert (len(data), data.dropped) == (2, 2)
  with caplog.at_level(logging.WARNING):
    data = pipeline.PreferenceData(path, tok, pipeline.DataOptions(
        max_seq_length=32, truncation="truncate_prompt_left"))
  assert (len(data), data.stats["dropped"], data.stats["truncated"]) == (3, 1, 1)
  assert "1 pairs truncated, 1 dropped" in caplog.text
  pair = data[1]  # The long prompt, cut from the left after BOS.
  assert len(pair["chosen"]) == 32 and pair["chosen"][0] == tok.bos_id
  prompt = long_prompt["prompt"]  # Joint: the response's ids after the prompt's.
  response = tok.encode(prompt + "1 2 3 4")[len(tok.encode(prompt)):]
  assert pair["chosen"][pair["prompt_len"]:].tolist() == response + [tok.eos_id]
  data = pipeline.PreferenceData(path, tok, pipeline.DataOptions(
      max_seq_length=32, truncation="truncate_response_right"))
  assert (len(data), data.stats["truncated"], data.stats["dropped"]) == (3, 1, 1)
  assert max(len(data[1]["rejected"]), len(data[1]["chosen"])) == 32


# --- batches -------------------------------------------------------------------------------
def test_collate_layout(tok):
  record = {"prompt": GOOD["prompt"], "chosen": GOOD["chosen_response"],
            "rejected": GOOD["rejected_response"], "chosen_reward": 0.5}
  pair = tokenize_pair(record, tok)
  batch = batching.collate([pair, None, pair, pair], micro_batch_size=2, seq_len=32, opts=OPTS)
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


def toy_data(tmp_path, tok, n=6, **kw):
  rows = [dict(GOOD, prompt=f"Count from {i}." + " and" * (i % 4)) for i in range(n)]
  path = write_lines(tmp_path, [json.dumps(r) for r in rows], "toy.jsonl")
  return pipeline.PreferenceData(path, tok, pipeline.DataOptions(max_seq_length=32, **kw))


def test_train_dataset_reshuffles_each_epoch_and_resumes(tmp_path, tok):
  data = toy_data(tmp_path, tok)
  ds = batching.train_dataset(data, global_batch_size=2, micro_batch_size=1, seed=3)
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


@pytest.mark.parametrize("packing_opt", ["none", "first_fit_decreasing", "first_fit_shuffle"])
def test_resume_mid_epoch_yields_exactly_the_uninterrupted_batches(tmp_path, tok, packing_opt):
  data = toy_data(tmp_path, tok, n=11, packing=packing_opt, pack_size=64)
  kw = dict(global_batch_size=2, micro_batch_size=1, seed=7)
  straight = iter(batching.train_dataset(data, **kw))
  reference = [next(straight) for _ in range(12)]  # Several epochs.
  for stop in (3, 7):
    it = iter(batching.train_dataset(data, **kw))
    for _ in range(stop):
      next(it)
    state = json.loads(json.dumps(it.get_state()))  # As the checkpoint stores it.
    resumed = iter(batching.train_dataset(data, **kw))
    resumed.set_state(state)
    for want in reference[stop:]:
      got = next(resumed)
      assert got.keys() == want.keys()
      for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} after resume at {stop}")


@pytest.mark.parametrize("packing_opt", ["none", "first_fit_decreasing"])
def test_no_shuffle_follows_the_file_order_and_resumes(tmp_path, tok, packing_opt):
  """data.shuffle=False: step k trains on pairs (k-1)B .. kB-1 of the file (modulo its
  length: epochs run into each other), as TRL's sequential sampler; packed, on the packing's
  rows in order every epoch. A resumed iterator continues exactly."""
  data = toy_data(tmp_path, tok, n=11, packing=packing_opt, pack_size=64, shuffle=False)
  kw = dict(global_batch_size=4, micro_batch_size=2, seed=7)
  it = iter(batching.train_dataset(data, **kw))
  batches = [next(it) for _ in range(8)]  # About three epochs.
  pairs = lambda b: b["pair_index"][b["pair_mask"] > 0].tolist()
  if packing_opt == "none":
    for k, b in enumerate(batches):
      assert pairs(b) == [i % 11 for i in range(4 * k, 4 * k + 4)]
      np.testing.assert_array_equal(b["tokens"][0, 0, :len(data[pairs(b)[0]]["chosen"])],
                                    data[pairs(b)[0]]["chosen"])
    assert [data[i]["line"] for i in range(11)] == list(range(1, 12))  # Index = file order.
  else:  # Rows of epoch e in the order first_fit_decreasing (seed [7, e]) gives them.
    rows = []
    for e in range(4):
      row_starts, items = packing.pack(data.row_lengths, 64, "first_fit_decreasing", seed=[7, e])
      rows += [items[row_starts[r]:row_starts[r + 1]].tolist() for r in range(len(row_starts) - 1)]
    assert len(rows) >= 4 * 4
    for k, b in enumerate(batches[:len(rows) // 4]):
      for a in range(2):  # Micro-batch a holds rows 4k + 2a and 4k + 2a + 1.
        want = rows[4 * k + 2 * a] + rows[4 * k + 2 * a + 1]
        assert b["pair_index"][a][b["pair_mask"][a] > 0].tolist() == want, (k, a)
  for stop in (3, 5):
    resumed = iter(batching.train_dataset(data, **kw))
    resumed.set_state(json.loads(json.dumps(_state_after(data, kw, stop))))
    for want in batches[stop:]:
      got = next(resumed)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=f"{key} after {stop}")
  with pytest.raises(DataError, match="data.packing=first_fit_shuffle .* data.shuffle=False"):
    pipeline.DataOptions(max_seq_length=32, packing="first_fit_shuffle", shuffle=False)


def _state_after(data, kw, steps):
  it = iter(batching.train_dataset(data, **kw))
  for _ in range(steps):
    next(it)
  return it.get_state()


def test_toy_val_warning_names_the_key():
  user = "/data/my_pairs.jsonl"
  message = pipeline.toy_val_warning(user, pipeline.TOY_VAL)
  assert message.startswith(f"WARNING: data.train_path={user} but data.val_path is still the "
                            f"shipped toy set ({pipeline.TOY_VAL})")
  assert "--config.data.val_path" in message
  assert pipeline.toy_val_warning(pipeline.TOY_TRAIN, pipeline.TOY_VAL) is None  # Default run.
  assert pipeline.toy_val_warning(user, "/data/my_val.jsonl") is None
  cfg = load_default_config().data  # The config's defaults are the paths it compares with.
  assert pipeline.toy_val_warning(cfg.train_path, cfg.val_path) is None
  assert pipeline.toy_val_warning(user, cfg.val_path) is not None


def test_reader_threads_do_not_change_the_batches(tmp_path, tok):
  kw = dict(global_batch_size=2, micro_batch_size=1, seed=2)
  base = toy_data(tmp_path, tok, n=9, packing="first_fit_shuffle", pack_size=64)
  threaded = toy_data(tmp_path, tok, n=9, packing="first_fit_shuffle", pack_size=64,
                      read_threads=3, prefetch=5)
  a = iter(batching.train_dataset(base, **kw))
  b = iter(batching.train_dataset(threaded, **kw))
  for _ in range(8):
    want, got = next(a), next(b)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k])


@pytest.mark.parametrize("packing_opt", ["none", "first_fit_decreasing"])
def test_processes_take_their_block_of_every_micro_batch(tmp_path, tok, packing_opt):
  data = toy_data(tmp_path, tok, n=16, packing=packing_opt, pack_size=64)
  kw = dict(global_batch_size=4, micro_batch_size=2, seed=1)
  whole = iter(batching.train_dataset(data, process_index=0, process_count=1, **kw))
  parts = [iter(batching.train_dataset(data, process_index=k, process_count=2, **kw))
           for k in range(2)]
  for _ in range(4):
    want = next(whole)
    got = [next(p) for p in parts]
    assert got[0]["tokens"].shape[:2] == (want["tokens"].shape[0], want["tokens"].shape[1] // 2)
    for k in want:  # The global batch is the processes' batches side by side (axis 1).
      np.testing.assert_array_equal(np.concatenate([g[k] for g in got], axis=1), want[k])
  ekw = dict(global_batch_size=4, micro_batch_size=2)
  evals = [batching.eval_batches(data, process_index=k, process_count=2, **ekw)
           for k in range(2)]
  for k, want in enumerate(batching.eval_batches(data, process_index=0, process_count=1,
                                                 **ekw)):
    for key in want:
      np.testing.assert_array_equal(
          np.concatenate([evals[0][k][key], evals[1][k][key]], axis=1), want[key])
  with pytest.raises(DataError, match=r"train.micro_batch_size=2, itself a multiple of the "
                     r"3 processes"):
    batching.train_dataset(data, process_index=0, process_count=3, **kw)


def test_packed_epoch_covers_every_pair_once(tmp_path, tok):
  data = toy_data(tmp_path, tok, n=20, packing="first_fit_decreasing", pack_size=64)
  stream = batching.RowStream(data, seed=0)
  for e in range(2):
    row_starts, items = stream.epoch(e)
    assert sorted(items.tolist()) == list(range(20))
    sums = np.add.reduceat(data.pair_lengths[items], row_starts[:-1])
    assert sums.max() <= 64
  rows = stream.rows(0, stream.rows_in_epoch(0) + 2)  # Runs into epoch 1.
  assert sorted(np.concatenate(rows[:stream.rows_in_epoch(0)]).tolist()) == list(range(20))
  assert data.stats["format"] == "nemo"


def test_eval_batches_pad_the_last_batch(tmp_path, tok):
  data = toy_data(tmp_path, tok, n=5)
  batches = batching.eval_batches(data, global_batch_size=4, micro_batch_size=2)
  assert len(batches) == 2 and batches[1]["pair_mask"].tolist() == [[1, 0], [0, 0]]
  data = toy_data(tmp_path, tok, n=5, packing="first_fit_decreasing", pack_size=64)
  batches = batching.eval_batches(data, global_batch_size=2, micro_batch_size=1)
  assert sum(b["pair_mask"].sum() for b in batches) == 5
  assert batches[0]["tokens"].shape[1:] == (1, 64)
  assert data.stats["packing"]["pairs"] == 5


def test_too_few_rows_for_a_packed_global_batch(tmp_path, tok):
  data = toy_data(tmp_path, tok, n=3, packing="first_fit_decreasing", pack_size=128)
  with pytest.raises(DataError, match=r"3 pairs pack into 1 rows of 128 tokens, fewer than "
                     r"train.global_batch_size=2 \(rows per step when packing\)"):
    batching.train_dataset(data, global_batch_size=2, micro_batch_size=1, seed=0)


# --- offline packing -----------------------------------------------------------------------
def test_pack_cli_writes_a_dataset_training_reads(tmp_path, tok, marker_tok, capsys):
  rows = [dict(GOOD, prompt=f"Count from {i}." + " and" * (i % 5), chosen_reward=i)
          for i in range(9)]
  src = write_lines(tmp_path, [json.dumps(r) for r in rows], "in.jsonl")
  out = str(tmp_path / "packed")
  args = ["--input", src, "--output", out, "--pack_size", "64", "--max_seq_length", "32",
          "--strategy", "first_fit_decreasing", "--seed", "3", "--tokenizer_path", TOKENIZER]
  stats = pack_cli.main(args)
  printed = capsys.readouterr().out
  assert f"Packed 9 pairs of {src} into {stats['rows']} rows of 64 tokens" in printed
  assert f"token efficiency {100 * stats['token_efficiency']:.2f}%" in printed
  assert not any(f.endswith(".pkl") for f in os.listdir(out))
  for name in packed_dir.PACKED_ARRAYS:  # Plain arrays: loadable without pickle.
    np.load(os.path.join(out, f"{name}.npy"), allow_pickle=False)

  opts = pipeline.DataOptions(max_seq_length=32)
  jsonl = pipeline.PreferenceData(src, tok, opts)
  packed = pipeline.PreferenceData(out, tok, opts)
  assert packed.packed and packed.packed_size == 64 and len(packed) == 9
  by_line = {jsonl[i]["line"]: jsonl[i] for i in range(len(jsonl))}
  for i in range(len(packed)):
    pair, want = packed[i], by_line[packed[i]["line"]]
    for k in ("chosen", "rejected"):
      np.testing.assert_array_equal(pair[k], want[k])
    assert pair["prompt_len"] == want["prompt_len"]
    assert pair["chosen_reward"] == want["chosen_reward"] and pair["rejected_reward"] is None
    assert packed.line(i) == pair["line"]
  assert packed.source_path == src
  assert stats["token_efficiency"] == pytest.approx(
      packed.pair_lengths.sum() / (stats["rows"] * 64))
  # Every pair once per pass over the rows, in the packing the file holds.
  batches = batching.eval_batches(packed, global_batch_size=1, micro_batch_size=1)
  assert len(batches) == stats["rows"]
  seen = [r for b in batches for r in b["chosen_reward"][b["pair_mask"] > 0].tolist()]
  assert sorted(seen) == list(range(9))
  batch = next(iter(batching.train_dataset(packed, global_batch_size=2, micro_batch_size=1,
                                           seed=0)))
  assert batch["tokens"].shape == (2, 1, 64)
  assert batch["pair_mask"].shape == (2, stats["pairs_per_row_max"])  # Slots of one row.

  with pytest.raises(DataError, match="exists"):
    pack_cli.main(args)
  with pytest.raises(DataError, match=r"packed with template='plain', but data.template='nemo'"):
    pipeline.PreferenceData(out, tok, pipeline.DataOptions(max_seq_length=32, template="nemo"))
  with pytest.raises(DataError, match="which differs from data.tokenizer_path"):
    pipeline.PreferenceData(out, marker_tok, opts)
  # data.share_prompt=True (the default) shares the prompt where the rows allow it: rows packed
  # without it are read as they are.
  unshared = pipeline.PreferenceData(out, tok, pipeline.DataOptions(max_seq_length=32,
                                                                    share_prompt=True))
  assert not unshared.share_prompt and len(unshared) == 9
  assert "branch_ids" not in batching.eval_batches(unshared, global_batch_size=1,
                                                   micro_batch_size=1)[0]
  with pytest.raises(DataError, match=r"packed with boundary='joint', but "
                     r"data.boundary='apart'; repack or change data.boundary"):
    pipeline.PreferenceData(out, tok, pipeline.DataOptions(max_seq_length=32, boundary="apart"))
  # A directory packed before share_prompt existed: its meta.json lacks the key (= False).
  meta_path = os.path.join(out, "meta.json")
  with open(meta_path) as f:
    meta = json.load(f)
  del meta["share_prompt"]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  assert len(pipeline.PreferenceData(out, tok, opts)) == 9
  # ... and before data.boundary: its responses were tokenized apart.
  del meta["boundary"]
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  with pytest.raises(DataError, match=r"packed with boundary='apart', but data.boundary='joint'"):
    pipeline.PreferenceData(out, tok, opts)
  meta["boundary"] = "joint"
  with open(meta_path, "w") as f:
    json.dump(meta, f)
  assert not pipeline.PreferenceData(out, tok, pipeline.DataOptions(
      max_seq_length=32, share_prompt=True)).share_prompt
  # data.share_prompt does not apply to padded (unpacked) data: two rows per pair, no branches.
  padded = pipeline.PreferenceData(src, tok, pipeline.DataOptions(max_seq_length=32,
                                                                  share_prompt=True))
  assert not padded.share_prompt
  assert "branch_ids" not in batching.eval_batches(padded, global_batch_size=1,
                                                   micro_batch_size=1)[0]
  # Packed for a shared prompt: rows hold len_c + len_r - (P - 1) tokens per pair.
  shared_out = str(tmp_path / "packed_shared")
  shared_stats = pack_cli.main(args[:2] + ["--output", shared_out] + args[4:] +
                               ["--share_prompt"])
  shared = pipeline.PreferenceData(shared_out, tok, pipeline.DataOptions(max_seq_length=32,
                                                                         share_prompt=True))
  np.testing.assert_array_equal(shared.row_lengths,
                                shared.pair_lengths - (shared.prompt_len - 1))
  assert shared_stats["rows"] < stats["rows"]
  assert shared_stats["token_efficiency"] == pytest.approx(
      shared.row_lengths.sum() / (shared_stats["rows"] * 64))
  batch = batching.eval_batches(shared, global_batch_size=1, micro_batch_size=1)[0]
  assert batch["branch_ids"].shape == batch["tokens"].shape
  with pytest.raises(DataError, match=r"packed with share_prompt=True, but "
                     r"data.share_prompt=False"):  # e.g. ORPO, which reads the prompt.
    pipeline.PreferenceData(shared_out, tok, pipeline.DataOptions(max_seq_length=32))
  with pytest.raises(DataError, match=r"data.pack_size=32 is smaller than 2 x "
                     r"data.max_seq_length=32"):
    pack_cli.main(args[:4] + ["--pack_size", "32"] + args[6:] + ["--overwrite"])
