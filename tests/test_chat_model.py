"""A chat model's first hour (issue 32): a Hugging Face folder with a byte-level BPE
tokenizer.json and a ChatML template that adds a default system prompt, trained on TRL-style
conversational pairs with init.path alone.

The run renders the data with the checkpoint's own template (run_config.json says so), an
explicit other template warns, `generate` on the folder answers under that template exactly as
transformers' greedy decoding does, and `convert --from WORKDIR` (or one of its step folders)
writes the same folder as export.to, which transformers loads with its pad/unk token ids.
"""

import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import chat_fixtures
from conftest import ROOT, tiny_config
from dpojax import convert
from dpojax import generate as generate_lib
from dpojax.data import batching
from dpojax.formats import hf
from dpojax.train import build as build_lib
from dpojax.train import loop

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

STD = 0.12  # As test_hf_families: logits spread, so rounding cannot flip a greedy argmax.
QUESTIONS = ["Hello there, how are you?", "What is the quick brown fox?", "Tell me a story.",
             "Is the dog lazy?", "How are you today?", "What numbers do you know?"]


def conversational_rows(n):
  """TRL's conversational preference format: prompt messages, one assistant turn a side."""
  rows = []
  for i in range(n):
    prompt = [{"role": "user", "content": QUESTIONS[i % len(QUESTIONS)] + f" ({i})"}]
    if i % 3 == 0:
      prompt = [{"role": "system", "content": "Answer briefly."}] + prompt
    rows.append({"prompt": prompt,
                 "chosen": [{"role": "assistant", "content": f"I am fine, thank you {i}!"}],
                 "rejected": [{"role": "assistant", "content": "The lazy dog."}]})
  return rows


def write_jsonl(path, rows):
  with open(path, "w") as f:
    for r in rows:
      f.write(json.dumps(r) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def chat(tmp_path_factory):
  """(model folder, train.jsonl, val.jsonl): a tiny random Llama saved by transformers beside
  a ChatML tokenizer folder with a default system prompt, pad <|endoftext|>, no BOS."""
  base = tmp_path_factory.mktemp("chat")
  folder = str(base / "model")
  tk = chat_fixtures.train_bpe()
  chat_fixtures.write_folder(folder, tk, "system_default")
  with open(os.path.join(folder, "tokenizer_config.json")) as f:
    tok_cfg = json.load(f)
  tok_cfg["pad_token"] = "<|endoftext|>"
  with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
    json.dump(tok_cfg, f)
  pad = tk.token_to_id("<|endoftext|>")
  config = transformers.LlamaConfig(
      vocab_size=tk.get_vocab_size(), hidden_size=32, intermediate_size=48,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=256, tie_word_embeddings=True, bos_token_id=None,
      eos_token_id=tk.token_to_id("<|im_end|>"), pad_token_id=pad)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(config)
  with torch.no_grad():
    for name, p in model.named_parameters():
      p.copy_(torch.randn_like(p) * 0.1 + 1.0 if "norm" in name else torch.randn_like(p) * STD)
  model.save_pretrained(folder)
  with open(os.path.join(folder, "config.json")) as f:
    saved = json.load(f)
  saved["unk_token_id"] = pad  # As real checkpoints carry it (the BPE itself has no unk).
  with open(os.path.join(folder, "config.json"), "w") as f:
    json.dump(saved, f)
  train = write_jsonl(base / "train.jsonl", conversational_rows(16))
  val = write_jsonl(base / "val.jsonl", conversational_rows(4))
  return folder, train, val


def chat_config(chat, **data):
  folder, train, val = chat
  config = tiny_config()
  config.init.path = folder
  config.data.train_path, config.data.val_path = train, val
  config.data.max_seq_length = 96
  config.train.max_steps = 4
  config.eval.interval = 4
  config.checkpoint.interval = 2
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def test_default_run_renders_the_checkpoints_chat_template(chat):
  """Tokens equal transformers' apply_chat_template of each whole conversation, and the
  prompt's tokens (the loss mask's start) its rendering with add_generation_prompt."""
  folder, train, _ = chat
  config = chat_config(chat)
  assert config.data.template == "auto"  # The default: nothing to set.
  pretrained = loop.pretrained_lib.load_pretrained(config, folder)
  tok, train_data, _, _ = build_lib.build(config, pretrained)
  assert train_data.opts.template == "auto" and tok.chat_template is not None
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  rows = conversational_rows(16)
  batch = batching.collate([train_data[i] for i in range(4)], micro_batch_size=4,
                           seq_len=config.data.max_seq_length, opts=train_data.opts)
  for i in range(4):
    want_prompt = auto.apply_chat_template(rows[i]["prompt"], add_generation_prompt=True,
                                           tokenize=True, return_dict=False)
    for side, s in (("chosen", 0), ("rejected", 1)):
      want = auto.apply_chat_template(rows[i]["prompt"] + rows[i][side], tokenize=True,
                                      return_dict=False)
      row = batch["tokens"][0, 2 * i + s]
      n = len(want)
      assert row[:n].tolist() == want
      assert (batch["segment_ids"][0, 2 * i + s, n:] == 0).all()  # Nothing appended.
      mask = batch["loss_mask"][0, 2 * i + s]
      assert not mask[:len(want_prompt)].any() and mask[len(want_prompt):n].all()
  # Row 1 has no system message: the template's default one was rendered.
  assert "You are Qwen" in auto.decode(batch["tokens"][0, 2].tolist())


@pytest.mark.slow
def test_explicit_template_wins_with_a_warning(chat, tmp_path, capsys):
  config = chat_config(chat, template="plain")
  config.train.max_steps = 1
  config.eval.at_start = False
  loop.run(config, str(tmp_path / "run"))
  out = capsys.readouterr().out
  warnings = [l for l in out.splitlines() if l.startswith("WARNING: data.template=plain")]
  assert len(warnings) == 1 and "leave data.template at auto" in warnings[0], out
  with open(tmp_path / "run" / "run_config.json") as f:
    assert json.load(f)["data"]["template"] == "plain"


def _greedy_hf(folder, messages, n):
  auto = transformers.AutoTokenizer.from_pretrained(folder)
  model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation="eager").eval()
  ids = auto.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                 return_dict=False)
  with torch.no_grad():
    out = model.generate(torch.as_tensor([ids]), do_sample=False, max_new_tokens=n,
                         eos_token_id=model.generation_config.eos_token_id,
                         pad_token_id=model.config.pad_token_id)
  return out[0, len(ids):].tolist()


def _answers(checkpoint, prompt, tmp_path, n=12):
  out = tmp_path / f"answers-{abs(hash(checkpoint))}.jsonl"
  assert generate_lib.main(["--checkpoint", checkpoint, "--prompt", prompt,
                            "--max_new_tokens", str(n), "--output", str(out)]) == 0
  with open(out) as f:
    return json.loads(f.readline())


def _until_stop(ids, folder):
  """transformers' greedy ids up to its first stop id (dpojax's answers leave it out)."""
  stop = transformers.AutoTokenizer.from_pretrained(folder).convert_tokens_to_ids("<|im_end|>")
  return ids[:ids.index(stop)] if stop in ids else ids


def test_generate_answers_under_the_folders_template(chat, tmp_path):
  """No --template: the folder's chat template (with its default system prompt), as
  transformers renders it; the greedy answer is transformers' and not empty."""
  folder = chat[0]
  prompt = "Hello there, how are you?"
  got = _answers(folder, prompt, tmp_path)["policy_ids"]
  want = _greedy_hf(folder, [{"role": "user", "content": prompt}], 12)
  assert got and got == _until_stop(want, folder)


def _folder_files(path):
  return sorted(n for n in os.listdir(path))


def _assert_same_folder(a, b):
  assert _folder_files(a) == _folder_files(b)
  for name in _folder_files(a):
    with open(os.path.join(a, name), "rb") as fa, open(os.path.join(b, name), "rb") as fb:
      assert fa.read() == fb.read(), name


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True])
def test_convert_workdir_equals_export_and_loads_in_transformers(chat, tmp_path, lora):
  folder = chat[0]
  config = chat_config(chat)
  config.export.to = str(tmp_path / "export")
  if lora:
    config.lora.enabled = True
    config.lora.rank = 4
  workdir = str(tmp_path / "run")
  loop.run(config, workdir)
  with open(os.path.join(workdir, "run_config.json")) as f:
    assert json.load(f)["data"]["template"] == "auto"
  out = str(tmp_path / "converted")
  assert convert.main(["--from", workdir, "--to", out]) == 0
  _assert_same_folder(out, config.export.to)
  step = str(tmp_path / "step4")
  assert convert.main(["--from", os.path.join(workdir, "checkpoints", "4"), "--to", step]) == 0
  _assert_same_folder(step, config.export.to)
  earlier = str(tmp_path / "step2")
  assert convert.main(["--from", os.path.join(workdir, "checkpoints", "2"), "--to",
                       earlier]) == 0
  a, b = hf.load_hf(earlier).params, hf.load_hf(out).params
  assert any(not np.array_equal(x, y) for x, y in zip(
      jax_leaves(a), jax_leaves(b)))  # Step 2 is another policy.
  with open(os.path.join(out, "config.json")) as f:
    written = json.load(f)
  with open(os.path.join(folder, "config.json")) as f:
    source = json.load(f)
  assert written["pad_token_id"] == source["pad_token_id"]
  assert written["unk_token_id"] == source["unk_token_id"]
  if not lora:  # A .nemo holds a SentencePiece model only: refused in one line.
    assert convert.main(["--from", workdir, "--to", str(tmp_path / "x.nemo")]) == 1
  model, info = transformers.AutoModelForCausalLM.from_pretrained(
      out, dtype=torch.float32, output_loading_info=True)
  assert all(not v for v in info.values()), info
  assert model.config.pad_token_id == source["pad_token_id"]
  auto = transformers.AutoTokenizer.from_pretrained(out)
  assert auto.chat_template == transformers.AutoTokenizer.from_pretrained(folder).chat_template
  # The trained run answers as transformers does on its export, under the same template.
  prompt = "Tell me a story."
  got = _answers(workdir, prompt, tmp_path)["policy_ids"]
  want = _greedy_hf(out, [{"role": "user", "content": prompt}], 12)
  assert got == _until_stop(want, out)


def jax_leaves(tree):
  for key in sorted(tree):
    value = tree[key]
    yield from (jax_leaves(value) if isinstance(value, dict) else [value])


def _walkthrough_commands():
  """The shell block of README's "A chat model, end to end", continuations joined."""
  with open(os.path.join(ROOT, "README.md")) as f:
    text = f.read()
  section = text[text.index("### A chat model, end to end"):]
  block = re.search(r"```shell\n(.*?)```", section, flags=re.S).group(1)
  lines = re.sub(r"\\\n\s*", " ", block).splitlines()
  return [l.split("  #", 1)[0].strip() for l in lines if l.strip()]


@pytest.mark.slow
def test_readme_chat_model_walkthrough_runs_as_written(tmp_path):
  """Each command of the walk-through (the pip line aside), with /tmp moved under tmp_path
  and a shorter run: the training renders with the checkpoint's template, generate answers,
  convert writes the folder and transformers loads it."""
  commands = _walkthrough_commands()
  assert commands[0].startswith("pip install") and len(commands) == 6, commands
  env = dict(os.environ, PYTHONPATH=ROOT)
  outputs = []
  for command in commands[1:]:
    argv = [a.replace("/tmp/", f"{tmp_path}/") for a in shlex.split(command)]
    if argv[:3] == ["python", "-m", "dpojax.main"]:
      argv += ["--config.train.max_steps=4", "--config.eval.interval=4",
               "--config.eval.max_batches=1", "--config.train.peak_flops=-1",
               "--config.checkpoint.async_save=False"]
    argv[0] = sys.executable
    proc = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (command, proc.stderr[-3000:])
    outputs.append(proc.stdout)
  train_out, generate_out = outputs[1], outputs[2]
  assert f"template: the chat template of {tmp_path}/byo/model" in train_out
  with open(tmp_path / "byo_run" / "run_config.json") as f:
    assert json.load(f)["data"]["template"] == "auto"
  assert generate_out.startswith("=== prompt 1: Count from 3 to 9.\n")
  assert os.path.isfile(tmp_path / "byo_aligned" / "model.safetensors")
  template = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "byo_aligned")).chat_template
  assert template is not None and "<|im_start|>" in template
