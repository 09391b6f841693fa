"""KV-cache decoding against the full forward, sampling filters, and generation end to end:
the stories260K fixture's reference greedy text, from the cache, through the library and CLI."""

import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from dpojax import convert
from dpojax import generate as gen
from dpojax import workdir as workdir_lib
from dpojax.checkpoint.orbax import Checkpointer
from dpojax.data import templates
from dpojax.data.tokenize import Tokenizer, load_tokenizer, tokenize_pair
from dpojax.model import transformer
from dpojax.train import step as step_lib

import chat_fixtures
import stories260k as S
from conftest import tiny_config

VARIANTS = {
    # GQA (2 query heads per group), RoPE on half of each head, kv_channels != hidden / heads.
    "gqa_partial_rope": transformer.ModelConfig(
        vocab_size=40, hidden_size=32, num_layers=2, num_attention_heads=4, num_query_groups=2,
        kv_channels=10, ffn_hidden_size=48, rotary_percentage=0.4),
    # Learned absolute positions, MHA, biases, layernorm1p, gelu, untied output.
    "learned_absolute": transformer.ModelConfig(
        vocab_size=40, hidden_size=32, num_layers=2, num_attention_heads=2, ffn_hidden_size=48,
        position_embedding_type="learned_absolute", max_position_embeddings=32, bias=True,
        normalization="layernorm1p", activation="gelu", share_embeddings_and_output_weights=False),
}
CHUNKS = (5, 2, 1)  # A prefill, a 2-token chunk, then single decode steps.


def small_params(cfg, seed=0):
  # Scaled so that softmaxes are neither one-hot nor uniform.
  return jax.tree.map(lambda x: np.asarray(0.3 * x, np.float32), S.random_params(cfg, seed))


def logits(params, cfg, hidden):
  w = np.asarray(transformer.output_weight(params, cfg), np.float64)
  return np.asarray(hidden, np.float64) @ w.T


@functools.partial(jax.jit, static_argnums=1)
def full_and_cached(params, cfg, right, left):
  """Hidden states of an uncached forward over `right` and of `CHUNKS` cached calls over
  `left` (each a (tokens, positions, segments) triple); one compilation."""
  full = transformer.apply(params, cfg, *right)
  cache = transformer.init_cache(cfg, right[0].shape[0], 16)
  hidden, start = [], 0
  for size in CHUNKS:
    h, cache = transformer.decode(params, cfg, cache, *(x[:, start:start + size] for x in left))
    hidden.append(h)
    start += size
  return full, jnp.concatenate(hidden, axis=1), cache


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_decoding_equals_full_forward(name):
  """Two rows of lengths 8 and 5, left-padded with per-row positions and fed in chunks
  through the cache, give each row the logits of an uncached forward over that row alone."""
  cfg = VARIANTS[name]
  params = small_params(cfg)
  rng = np.random.default_rng(1)
  lengths, t = [8, 5], sum(CHUNKS)
  rows = [rng.integers(0, cfg.vocab_size, n).astype(np.int32) for n in lengths]
  pad = [t - n for n in lengths]
  right = [np.zeros((2, t), np.int32) for _ in range(3)]  # Segment 0 = padding.
  left = [np.zeros((2, t), np.int32) for _ in range(3)]
  for b, r in enumerate(rows):
    right[0][b, :len(r)], right[1][b], right[2][b, :len(r)] = r, np.arange(t), 1
    left[0][b, pad[b]:], left[2][b, pad[b]:] = r, 1
    left[1][b, pad[b]:] = np.arange(len(r))
  full, cached, cache = full_and_cached(params, cfg, right, left)
  want, got = logits(params, cfg, full), logits(params, cfg, cached)
  for b in range(2):
    np.testing.assert_allclose(got[b, pad[b]:], want[b, :lengths[b]], rtol=1e-5, atol=1e-5)
  assert int(cache["index"]) == t
  # The cache holds exactly the written slots' segments.
  np.testing.assert_array_equal(np.asarray(cache["segment_ids"])[:, :t], left[2])
  assert not np.asarray(cache["segment_ids"])[:, t:].any()


@pytest.fixture(scope="module")
def stories():
  return convert.load(S.HF_DIR)


def test_stories260k_greedy_with_kv_cache(stories):
  """The fixture's 64 reference greedy ids from BOS, and (in the same left-padded batch) the
  continuation of 'Once upon a time', which greedy decoding from BOS starts with."""
  cfg, params, _ = stories
  ref = S.REFERENCE
  once = ref["once_upon_a_time_ids"]
  assert once[1:] == ref["greedy_ids"][:4] and 1 not in ref["greedy_ids"]
  out = gen.generate(params, cfg, [ref["prompt_ids"], once], max_new_tokens=64, stop_ids=[1])
  assert out[0] == ref["greedy_ids"]
  assert out[1][:60] == ref["greedy_ids"][4:]


def test_stop_ids_end_each_row_independently(stories):
  cfg, params, _ = stories
  ref = S.REFERENCE
  prompts = [ref["prompt_ids"], ref["once_upon_a_time_ids"]]
  stop = ref["greedy_ids"][12]  # Same shapes as above: no new compilation.
  first = ref["greedy_ids"].index(stop)
  stopped = gen.generate(params, cfg, prompts, max_new_tokens=64, stop_ids=[stop, 1])
  assert stopped[0] == ref["greedy_ids"][:first]
  assert stopped[1] == ref["greedy_ids"][4:first]


def test_cli_reproduces_reference_text_from_nemo_and_hf(tmp_path, capsys):
  """`--checkpoint X.nemo --reference HF_DIR --compare_reference`: both answers are the
  reference greedy text; the printed table shows them side by side."""
  ref = S.REFERENCE
  out = tmp_path / "out.jsonl"
  args = ["--checkpoint", S.NEMO["mcore-torch_dist"], "--reference", S.HF_DIR,
          "--compare_reference", "--prompt", ref["prompt_text"], "--prompt", "Once upon a time",
          "--max_new_tokens", "64", "--stop_ids", "1"]
  assert gen.main(args + ["--output", str(out)]) == 0
  first, second = [json.loads(l) for l in out.read_text().splitlines()]
  assert first["policy_ids"] == ref["greedy_ids"] == first["reference_ids"]
  assert first["policy"] == ref["greedy_text"] == first["reference"]
  assert second["policy_ids"][:60] == ref["greedy_ids"][4:] == second["reference_ids"][:60]
  capsys.readouterr()
  assert gen.main(args) == 0
  table = capsys.readouterr().out.splitlines()
  assert table[0] == "=== prompt 1: "
  assert table[1].split() == ["policy", "|", "reference"]
  left, right = table[3].split(" | ")
  assert left.strip() == right.strip() and ref["greedy_text"].startswith(left.strip())
  assert len(left.strip()) > 20


def np_filter(row, top_k, top_p):
  """Independent float64 top-k then top-p (the HF warpers' definition): kept token indices."""
  order = np.argsort(-row, kind="stable")
  keep = set(order[:top_k]) if top_k else set(range(len(row)))
  kept = np.array(sorted(keep, key=lambda i: -row[i]))
  p = np.exp(row[kept] - row[kept].max())
  p /= p.sum()
  mass_before = np.cumsum(p) - p
  return set(kept[mass_before < top_p].tolist())


def test_filter_logits_matches_top_k_top_p_definitions():
  rng = np.random.default_rng(0)
  logits_BxV = rng.normal(size=(6, 50)) * 2
  for top_k, top_p in [(0, 0.5), (5, 1.0), (10, 0.8), (0, 0.99), (3, 0.01)]:
    got = np.asarray(gen.filter_logits(jnp.asarray(logits_BxV, jnp.float32), top_k, top_p))
    for b in range(6):
      assert set(np.flatnonzero(np.isfinite(got[b])).tolist()) == np_filter(
          logits_BxV[b], top_k, top_p), (top_k, top_p, b)
      kept = np.isfinite(got[b])
      np.testing.assert_allclose(got[b][kept], logits_BxV[b][kept], rtol=1e-6)


def test_sampling_frequencies_follow_temperature_and_top_k():
  logits_V = np.log(np.asarray([0.5, 0.3, 0.15, 0.05]))
  n = 20000
  batch = jnp.asarray(np.tile(logits_V, (n, 1)), jnp.float32)
  draws = np.asarray(gen.sample(batch, jax.random.key(0), gen.Sampling(2.0, top_k=3)))
  p = np.exp(logits_V[:3] / 2.0)
  p /= p.sum()
  freq = np.bincount(draws, minlength=4) / n
  assert freq[3] == 0
  np.testing.assert_allclose(freq[:3], p, atol=0.015)
  greedy = np.asarray(gen.sample(batch[:4], jax.random.key(1), gen.Sampling()))
  assert (greedy == 0).all()


@pytest.mark.parametrize("template", templates.TEMPLATES)
def test_prompt_ids_are_the_training_prompt_prefix(template):
  tok = Tokenizer(tiny_config().data.tokenizer_path)
  for prompt in ("Count from 3 to 6.",
                 "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: count to 3\n\nAssistant:",
                 [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": "Count to 3."}]):
    record = {"prompt": prompt, "chosen": " 1 2 3", "rejected": " 3 2 1",
              "dialogue": isinstance(prompt, str) and "Human:" in prompt}
    pair = tokenize_pair(record, tok, template=template)
    want = pair["chosen"][:pair["prompt_len"]].tolist()
    assert gen.prompt_ids(tok, prompt, template) == want


@pytest.mark.parametrize("style", ["chatml", "llama3"])
def test_prompt_ids_and_stop_ids_under_the_checkpoint_chat_template(tmp_path, style):
  """data.template=auto: the generation prompt is training's prompt (the template's own BOS,
  not doubled); generation stops at generation_config.json's eos ids."""
  tok = load_tokenizer(chat_fixtures.write_folder(str(tmp_path), chat_fixtures.train_bpe(),
                                                  style=style))
  prompt = chat_fixtures.CONVERSATIONS["multi_system"]
  pair = tokenize_pair({"prompt": prompt, "chosen": "1 2 3", "rejected": "3 2 1"}, tok,
                       template="auto")
  assert gen.prompt_ids(tok, prompt, "auto") == pair["chosen"][:pair["prompt_len"]].tolist()
  stops = [tok.piece_id(t) for t in chat_fixtures.STYLES[style][3]]
  assert gen.default_stop_ids(tok, "auto") == stops


def make_workdir(path, params, config, *, resolved):
  """A workdir as training leaves it: an Orbax checkpoint of `params` (step 2) and the run
  config, as run_config.json (resolved) or as the plain config.json that loop.run writes."""
  ckpt = Checkpointer(str(path), async_save=False, keep_best=False)
  ckpt.save(2, step_lib.init_state(jax.device_put(params), optax.sgd(0.1)), {"note": "test"})
  ckpt.close()
  if resolved:
    workdir_lib.write_config(str(path), config, transformer.ModelConfig.from_dict(config.model),
                             config.data.tokenizer_path)
  else:
    (path / "config.json").write_text(config.to_json_best_effort(indent=2))
  return str(path)


def cli_answers(argv, tmp_path):
  out = tmp_path / "answers.jsonl"
  assert gen.main(argv + ["--output", str(out)]) == 0
  return [json.loads(l) for l in out.read_text().splitlines()]


# Two prompts, 64 new tokens, greedy: the shapes compiled once for the stories260K model.
STORY_ARGS = ["--prompt", "", "--prompt", "Once upon a time", "--max_new_tokens", "64",
              "--stop_ids", "1"]


@pytest.mark.parametrize("resolved", [True, False], ids=["run_config", "plain_config"])
def test_workdir_policy_and_init_from_reference(stories, resolved, tmp_path):
  """init.path = the stories260K HF folder. run_config.json (workdir.write_config) holds the
  resolved architecture and tokenizer; a plain config.json (as loop.run writes it) holds
  tiny_config's model section (width 32, 1 layer) and the toy tokenizer, so both come from
  init.path as in training. Either way the reference answer is the fixture's greedy text and
  the policy answer that of the checkpoint's (different) params."""
  cfg, _, tokenizer = stories
  config = tiny_config()
  config.init.path = S.HF_DIR
  if resolved:
    for k, v in dataclasses.asdict(cfg).items():
      config.model[k] = v
    config.data.tokenizer_path = tokenizer
  policy = small_params(cfg, seed=5)
  path = make_workdir(tmp_path / "run", policy, config, resolved=resolved)
  answers = cli_answers(["--checkpoint", path, "--compare_reference"] + STORY_ARGS, tmp_path)
  assert answers[0]["reference_ids"] == S.REFERENCE["greedy_ids"]
  assert answers[0]["reference"] == S.REFERENCE["greedy_text"]
  want = gen.generate(policy, cfg, [[1], S.REFERENCE["once_upon_a_time_ids"]],
                      max_new_tokens=64, stop_ids=[1])
  assert [a["policy_ids"] for a in answers] == want
  assert want[0] != S.REFERENCE["greedy_ids"][:len(want[0])]


def test_clear_errors(tmp_path, capsys):
  def error(argv) -> str:  # One `error: ...` line, exit status 1, no traceback.
    assert gen.main(argv) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1, err
    return err
  bare = tmp_path / "bare"
  bare.mkdir()
  assert "no run_config.json" in error(["--checkpoint", str(bare), "--prompt", "x"])
  bad = tmp_path / "bad.jsonl"
  bad.write_text('{"prompt": "ok"}\n\n{"prompt": 3}\n')
  assert f"{bad}:3: field 'prompt': expected a string" in error(
      ["--checkpoint", S.HF_DIR, "--input", str(bad)])
  assert "pass --reference" in error(
      ["--checkpoint", S.HF_DIR, "--prompt", "x", "--compare_reference"])
  assert "--top_p=0.0 must be in (0, 1]" in error(
      ["--checkpoint", S.HF_DIR, "--prompt", "x", "--top_p", "0"])
  assert error(["--checkpoint", str(tmp_path / "gone.nemo"), "--prompt", "x"]) == (
      f"error: --checkpoint={tmp_path / 'gone.nemo'}: no such file or folder\n")
  with pytest.raises(ValueError, match="--top_p=0.0 must be in"):  # --debug: the traceback.
    gen.main(["--checkpoint", S.HF_DIR, "--prompt", "x", "--top_p", "0", "--debug"])


def test_sampling_sees_the_final_logit_softcap():
  """Generation samples from the same capped logits c * tanh(z / c) that training scores."""
  cfg = dataclasses.replace(VARIANTS["gqa_partial_rope"], final_logit_softcap=0.5)
  params = small_params(cfg)
  hidden = np.random.default_rng(3).normal(size=(3, cfg.hidden_size)).astype(np.float32)
  got = np.asarray(gen._logits(params, cfg, jnp.asarray(hidden)))  # pylint: disable=protected-access
  plain = logits(params, cfg, hidden)
  assert np.abs(plain - 0.5 * np.tanh(plain / 0.5)).max() > 0.1  # The cap bends these.
  np.testing.assert_allclose(got, 0.5 * np.tanh(plain / 0.5), atol=1e-5)
