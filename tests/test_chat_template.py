"""data.template=auto: Jinja chat templates render what transformers' apply_chat_template
renders, and the loss covers exactly the final assistant turn (its end-of-turn token
included), token by token."""

import json

import numpy as np
import pytest

from dpojax.data import batching, chat_template, pipeline
from dpojax.data.sources import RecordError
from dpojax.data.tokenize import load_tokenizer, tokenize_pair
import chat_fixtures

transformers = pytest.importorskip("transformers")

STYLES = sorted(chat_fixtures.STYLES)
# Gemma and Mistral templates alternate user/assistant after the optional system message.
ANSWER = {"chosen": "Sure: here is a short answer. 👍🏽", "rejected": "No.\n\nI  won't."}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
  tk = chat_fixtures.train_bpe()
  root = tmp_path_factory.mktemp("styles")
  return {s: chat_fixtures.write_folder(str(root / s), tk, style=s) for s in STYLES}


@pytest.fixture(scope="module")
def oracles(folders):
  return {s: transformers.AutoTokenizer.from_pretrained(f) for s, f in folders.items()}


@pytest.mark.parametrize("style", STYLES)
def test_renders_as_transformers(folders, oracles, style):
  tok, hf = load_tokenizer(folders[style]), oracles[style]
  for name, prompt in chat_fixtures.CONVERSATIONS.items():
    for messages, gen in ((prompt, True), (prompt, False),
                          (prompt + [{"role": "assistant", "content": ANSWER["chosen"]}], False)):
      want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
      got = chat_template.render(tok.chat_template, messages, add_generation_prompt=gen,
                                 variables=tok.template_variables())
      assert got == want, (style, name, gen)


@pytest.mark.parametrize("style", STYLES)
def test_loss_mask_is_exactly_the_final_assistant_turn(folders, oracles, style):
  """Tokens = transformers' ids of the whole conversation; the prompt (masked out) = its ids
  of the conversation before the final turn with the generation prompt; the rest (the loss)
  is the final turn with its end-of-turn token, and nothing is appended after it."""
  tok, hf = load_tokenizer(folders[style]), oracles[style]
  for name, prompt in chat_fixtures.CONVERSATIONS.items():
    record = dict(ANSWER, prompt=prompt, line=1)
    pair = tokenize_pair(record, tok, template="auto", add_bos=True, append_eos=True)
    want_prompt = hf.encode(hf.apply_chat_template(prompt, tokenize=False,
                                                   add_generation_prompt=True),
                            add_special_tokens=False)
    assert pair["prompt_len"] == len(want_prompt) and pair["straddled"] == 0, (style, name)
    for side in ("chosen", "rejected"):
      full = prompt + [{"role": "assistant", "content": record[side]}]
      want = hf.encode(hf.apply_chat_template(full, tokenize=False), add_special_tokens=False)
      if want[:len(want_prompt)] != want_prompt:  # A token across the boundary: apart.
        pytest.fail(f"{style} {name}: straddles (the fixture avoids it)")
      np.testing.assert_array_equal(pair[side], want, err_msg=f"{style} {name} {side}")
      assert list(pair[side][:pair["prompt_len"]]) == want_prompt
      response = hf.decode(want[len(want_prompt):])
      assert ANSWER[side].strip() in response, (style, name, response)
      assert set(tok.stop_ids) & set(pair[side][pair["prompt_len"]:].tolist())  # End of turn.
      assert not set(tok.stop_ids) & set(want_prompt[-1:])


def test_padded_batch_loss_mask_token_by_token(tmp_path, folders):
  """Through PreferenceData and the collated batch: loss_mask is 1 on the final turn only."""
  path = tmp_path / "pairs.jsonl"
  prompt = chat_fixtures.CONVERSATIONS["multi_system"]
  path.write_text(json.dumps(dict(ANSWER, prompt=prompt)) + "\n")
  tok = load_tokenizer(folders["chatml"])
  opts = pipeline.DataOptions(max_seq_length=128, template="auto")
  data = pipeline.PreferenceData(str(path), tok, opts)
  batch = batching.eval_batches(data, global_batch_size=1, micro_batch_size=1)[0]
  for row, side in enumerate(("chosen", "rejected")):
    tokens, mask = batch["tokens"][0, row], batch["loss_mask"][0, row]
    n = int(batch["segment_ids"][0, row].sum())
    assert tok.decode(tokens[:n][mask[:n] == 1]) == ANSWER[side] + "<|im_end|>\n"
    assert tok.decode(tokens[:n][mask[:n] == 0]).endswith("<|im_start|>assistant\n")


def test_template_that_is_not_prefix_stable_raises(tmp_path):
  """A template that renders earlier turns differently once the final one follows (here: a
  generation prompt the full rendering does not have) is refused per record."""
  folder = chat_fixtures.write_folder(str(tmp_path), chat_fixtures.train_bpe(), style="chatml")
  tok = load_tokenizer(folder)
  tok.meta = tok.meta.__class__(tok.meta.special_tokens, chat_fixtures.CHATML.replace(
      "'<|im_start|>assistant\n'", "'<|im_start|>assistant\n<think>\n'"), ())
  record = dict(ANSWER, prompt=chat_fixtures.CONVERSATIONS["single"], line=3,
                source="data.jsonl")
  with pytest.raises(RecordError, match=r"data.jsonl:3: field 'chosen': the chat template is "
                     "not prefix-stable") as e:
    tokenize_pair(record, tok, template="auto")
  assert e.value.reason == "template not prefix-stable"


def test_template_errors_and_helpers(folders):
  tok = load_tokenizer(folders["gemma"])
  bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
  with pytest.raises(Exception, match="Conversation roles must alternate"):
    chat_template.render(tok.chat_template, bad)
  src = "{{ strftime_now('%Y') | length }} {{ {'a': 'é<'} | tojson }}"
  assert chat_template.render(src, []) == '4 {"a": "é<"}'
