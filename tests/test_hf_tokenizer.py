"""The tokenizer.json backend against transformers' AutoTokenizer (the test extra's oracle):
a byte-level BPE built here (added special tokens, no BOS) and stories260K's tokenizer.json;
special tokens, stop ids and no double BOS."""

import json
import os
import shutil

import numpy as np
import pytest

from dpojax import convert
from dpojax import model as model_lib
from dpojax.data import templates
from dpojax.data.hf_tokenizer import HFTokenizer
from dpojax.data.sources import DataError
from dpojax.data.tokenize import Tokenizer, load_tokenizer, tokenize_pair
from dpojax.train import build
import chat_fixtures
from conftest import tiny_config

transformers = pytest.importorskip("transformers")
STORIES_SP = os.path.join(os.path.dirname(chat_fixtures.STORIES_TOKENIZER), "hf",
                          "tokenizer.model")

TEXTS = [
    "Hello there, how are you?",
    "naïve café — 日本語のテキスト",
    "emoji 👍🏽 🎉 and a flag 🇫🇷",
    "whitespace   runs\t\tand\n\n\nnewlines  \n   end   ",
    " leading space",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "<s>[INST] x [/INST] y</s><bos><start_of_turn>model\n",
    "",
]


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
  return chat_fixtures.write_folder(str(tmp_path_factory.mktemp("bpe")),
                                    chat_fixtures.train_bpe(), style="chatml")


def _oracle(folder):
  return transformers.AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("which", ["bpe", "stories260k"])
def test_encode_decode_equal_transformers(bpe_dir, which):
  folder = bpe_dir if which == "bpe" else chat_fixtures.STORIES_TOKENIZER
  ours, hf = load_tokenizer(folder), _oracle(folder)
  assert isinstance(ours, HFTokenizer)
  for text in TEXTS:
    ids = ours.encode(text)
    assert ids == hf.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == hf.decode(ids), text
  assert ours.bos_id == (-1 if hf.bos_token_id is None else hf.bos_token_id)
  assert ours.eos_id == hf.eos_token_id
  assert ours.vocab_size == len(hf)


def test_special_tokens_no_bos_and_stop_ids(bpe_dir):
  tok = load_tokenizer(os.path.join(bpe_dir, "tokenizer.json"))
  vocab = tok.tk.get_vocab()
  assert tok.bos_id == -1 and tok.special(templates.BOS) == []  # Qwen: no BOS.
  assert tok.eos_id == vocab["<|im_end|>"]
  assert tok.stop_ids == [vocab["<|im_end|>"], vocab["<|endoftext|>"]]  # generation_config.
  assert tok.special(templates.IM_START) == [vocab["<|im_start|>"]]  # An added token, whole.
  assert tok.encode("<|im_start|>") == [vocab["<|im_start|>"]]
  assert tok.template_variables() == {"eos_token": "<|im_end|>"}


def test_stories260k_tokenizer_json_matches_its_sentencepiece_model():
  sp = Tokenizer(STORIES_SP)
  hf = load_tokenizer(chat_fixtures.STORIES_TOKENIZER)
  assert (hf.bos_id, hf.eos_id, hf.vocab_size) == (sp.bos_id, sp.eos_id, sp.vocab_size)
  for text in ("Once upon a time", "Lily saw a big dog. She was happy!"):
    assert hf.encode(text) == sp.encode(text)


def test_template_bos_is_not_doubled(tmp_path):
  """Llama 3's template writes bos_token itself; data.add_bos adds none on top."""
  folder = chat_fixtures.write_folder(str(tmp_path), chat_fixtures.train_bpe(), style="llama3")
  tok = load_tokenizer(folder)
  record = {"prompt": [{"role": "user", "content": "Hi!"}], "chosen": "Hello!",
            "rejected": "Go away.", "line": 1}
  pair = tokenize_pair(record, tok, template="auto", add_bos=True, append_eos=True)
  bos = tok.bos_id
  for side in ("chosen", "rejected"):
    ids = pair[side]
    assert ids[0] == bos and int(np.sum(ids == bos)) == 1
    assert ids[-1] == tok.eos_id != ids[-2]  # The turn's <|eot_id|>, no EOS after it.
  # A template without bos_token gets BOS from data.add_bos, as TRL adds it.
  plain = chat_fixtures.write_folder(str(tmp_path / "nobos"), chat_fixtures.train_bpe(),
                                     bos="<s>", eos="</s>")
  tok = load_tokenizer(plain)
  pair = tokenize_pair(record, tok, template="auto", add_bos=True)  # No template: plain.
  assert pair["chosen"][0] == tok.bos_id and int(np.sum(pair["chosen"] == tok.bos_id)) == 1


def test_bad_tokenizer_paths(tmp_path):
  with pytest.raises(DataError, match="without tokenizer.json or tokenizer.model"):
    load_tokenizer(str(tmp_path))
  bad = tmp_path / "tokenizer.json"
  bad.write_text("{not json")
  with pytest.raises(DataError, match="cannot load a Hugging Face tokenizer"):
    load_tokenizer(str(bad))


def test_init_path_folder_with_only_tokenizer_json_gives_the_tokenizer(tmp_path):
  """A Llama 3 / Qwen folder has no tokenizer.model (the converter finds no tokenizer): its
  tokenizer.json is used, with init.checkpoint_tokenizer (the default)."""
  folder = chat_fixtures.write_folder(str(tmp_path), chat_fixtures.train_bpe(), style="chatml")
  config = tiny_config()
  config.init.path = folder
  config.model.vocab_size = 512
  model_cfg = model_lib.ModelConfig.from_dict(config.model)
  tok, _ = build.tokenizer_and_model(config, convert.Loaded(model_cfg, None, None))
  assert tok.path == os.path.join(folder, "tokenizer.json") and tok.chat_template
  config.init.checkpoint_tokenizer = False
  tok, _ = build.tokenizer_and_model(config, convert.Loaded(model_cfg, None, None))
  assert tok.path == config.data.tokenizer_path


def test_sentencepiece_backend_under_a_chat_template(tmp_path):
  """A SentencePiece model with a chat template in its folder: the template's "<s>" is the
  BOS id (not its characters), once, and the ids equal the tokenizer.json backend's."""
  template = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
              "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ ' ' + m['content'] + "
              "eos_token }}{% endif %}{% endfor %}")
  config = json.dumps({"bos_token": "<s>", "eos_token": "</s>", "chat_template": template})
  sp_dir, hf_dir = tmp_path / "sp", tmp_path / "hf"
  for folder, name, src in ((sp_dir, "tokenizer.model", STORIES_SP),
                            (hf_dir, "tokenizer.json",
                             os.path.join(chat_fixtures.STORIES_TOKENIZER, "tokenizer.json"))):
    folder.mkdir()
    shutil.copy(src, folder / name)
    (folder / "tokenizer_config.json").write_text(config)
  record = {"prompt": [{"role": "user", "content": "Once upon a time"}],
            "chosen": "there was a cat.", "rejected": "a dog ran.", "line": 1}
  pairs = [tokenize_pair(record, load_tokenizer(str(d)), template="auto") for d in (sp_dir, hf_dir)]
  for pair in pairs:
    assert pair["chosen"][0] == 1 and int(np.sum(pair["chosen"] == 1)) == 1
    assert pair["chosen"][-1] == 2 and pair["chosen"][-2] != 2  # The template's </s>, once.
  np.testing.assert_array_equal(pairs[0]["chosen"], pairs[1]["chosen"])
  assert pairs[0]["prompt_len"] == pairs[1]["prompt_len"]
