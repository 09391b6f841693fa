"""dpojax.formats.nemo: real .nemo fixtures (stories260K), round trips, layouts, safety."""

import io
import json
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
import sentencepiece as spm
import torch

from dpojax import model as model_lib
from dpojax.formats import nemo
from dpojax.formats import nemo_archive
from dpojax.formats import nemo_weights
from dpojax.formats.convert_common import CheckpointError
import stories260k as S


def read_members(path) -> dict:
  with tarfile.open(path) as tar:
    return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def write_tar(path, members: dict, gz=False):
  with tarfile.open(path, "w:gz" if gz else "w:") as tar:
    for name, data in members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))


def torch_bytes(obj) -> bytes:
  buf = io.BytesIO()
  torch.save(obj, buf)
  return buf.getvalue()


def legacy_state() -> dict:
  data = read_members(S.NEMO["legacy-ckpt"])["./model_weights.ckpt"]
  with torch.serialization.safe_globals([io.BytesIO]):
    return torch.load(io.BytesIO(data), weights_only=True)


def with_yaml(members: dict, **changes) -> dict:
  text = members["./model_config.yaml"].decode()
  for key, value in changes.items():
    text, n = re.subn(rf"(?m)^{key}: .*$", f"{key}: {value}", text)
    assert n == 1, key
  return {**members, "./model_config.yaml": text.encode()}


class Evil:
  """Unpickling this runs a shell command that creates `path`."""

  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


@pytest.fixture(scope="module")
def legacy():
  return nemo.load_nemo(S.NEMO["legacy-ckpt"])


# --- The real fixtures -----------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(S.NEMO))
def test_fixture_generates_reference_greedy_tokens(name, tmp_path):
  cfg, params, tokenizer = nemo.load_nemo(S.NEMO[name], extract_dir=str(tmp_path))
  assert (cfg.vocab_size, cfg.hidden_size, cfg.num_layers, cfg.num_attention_heads,
          cfg.groups, cfg.head_dim, cfg.ffn_hidden_size) == (512, 64, 5, 8, 4, 8, 172)
  assert (cfg.activation, cfg.normalization, cfg.position_embedding_type, cfg.bias,
          cfg.share_embeddings_and_output_weights) == ("swiglu", "rmsnorm", "rope", False, True)
  assert S.generate_reference(cfg, params) == S.REFERENCE["greedy_ids"]
  # The SentencePiece model inside the file was written to extract_dir and nowhere else.
  assert os.path.dirname(tokenizer) == str(tmp_path) and os.listdir(tmp_path) == [
      os.path.basename(tokenizer)]
  sp = spm.SentencePieceProcessor(model_file=tokenizer)
  assert [sp.bos_id()] + sp.encode("Once upon a time") == S.REFERENCE["once_upon_a_time_ids"]


def test_all_weight_layouts_give_identical_params(legacy):
  for name in ("mcore-torch_dist", "mcore-zarr"):
    cfg, params, _ = nemo.load_nemo(S.NEMO[name])
    assert cfg == legacy.config
    S.assert_bitwise(params, legacy.params, name)


@pytest.mark.parametrize("name", sorted(S.NEMO))
def test_import_export_import_is_bitwise(name, tmp_path):
  cfg, params, tokenizer = nemo.load_nemo(S.NEMO[name], extract_dir=str(tmp_path / "a"))
  out = str(tmp_path / "out.nemo")
  nemo.save_nemo(out, cfg, params, tokenizer)
  cfg2, params2, tokenizer2 = nemo.load_nemo(out, extract_dir=str(tmp_path / "b"))
  assert cfg2 == cfg
  S.assert_bitwise(params2, params)
  assert open(tokenizer2, "rb").read() == open(tokenizer, "rb").read()


def test_export_has_the_files_megatron_core_expects(legacy, tmp_path):
  out = str(tmp_path / "out.nemo")
  nemo.save_nemo(out, *legacy)
  members = read_members(out)
  tok = [n for n in members if n.endswith("_tokenizer.model")]
  assert len(tok) == 1 and re.fullmatch(r"\./[0-9a-f]{32}_tokenizer\.model", tok[0])
  assert sorted(n for n in members if n not in tok) == [
      "./model_config.yaml", "./model_weights/.metadata", "./model_weights/__0_0.distcp",
      "./model_weights/common.pt", "./model_weights/metadata.json"]
  with tarfile.open(out) as tar:
    assert tar.getmembers()[0].name == "."  # As NeMo's tar.add(dir, arcname=".").
  import yaml  # pylint: disable=g-import-not-at-top
  assert json.loads(members["./model_weights/metadata.json"]) == {
      "sharded_backend": "torch_dist", "sharded_backend_version": 1,
      "common_backend": "torch", "common_backend_version": 1}
  assert torch.load(io.BytesIO(members["./model_weights/common.pt"]), weights_only=True) == {}
  config = yaml.safe_load(members["./model_config.yaml"])
  assert config["tokenizer"]["model"] == "nemo:" + tok[0][2:]
  assert (config["mcore_gpt"], config["activation"], config["normalization"],
          config["num_query_groups"], config["make_vocab_size_divisible_by"]) == (
              True, "fast-swiglu", "rmsnorm", 4, 128)  # 512 pieces pad to 512 with 128.
  # One `_extra_state` object per linear layer (none for core attention), each a list [None].
  md = pickle.loads(members["./model_weights/.metadata"])  # Our own file: plain pickle.
  extra = sorted(k for k in md.state_dict_metadata if "_extra_state" in k)
  assert extra == sorted(f"model.decoder.layers.{m}._extra_state/shard_{i}_5"
                         for m in ("self_attention.linear_qkv", "self_attention.linear_proj",
                                   "mlp.linear_fc1", "mlp.linear_fc2") for i in range(5))
  data = members["./model_weights/__0_0.distcp"]
  for key in extra:
    info = [v for k, v in md.storage_data.items() if k.fqn == key][0]
    raw = data[info.offset:info.offset + info.length]
    assert torch.load(io.BytesIO(raw), weights_only=True) == [None]


def stored_keys(path) -> tuple[dict, list]:
  """({tensor key: global shape}, [object keys]) of an exported .nemo's torch_dist metadata."""
  raw = read_members(path)["./model_weights/.metadata"]
  md = nemo_weights._MetadataUnpickler(io.BytesIO(raw)).load()  # pylint: disable=protected-access
  tensors = {k: list(v.size) for k, v in md.state_dict_metadata.items() if hasattr(v, "size")}
  return tensors, sorted(k for k in md.state_dict_metadata if k not in tensors)


# What megatron-core 0.16.1's GPTModel.sharded_state_dict asks for, one entry per export
# switch; listed by running it (tests/testdata/megatron_core_keys.py, which also loaded each
# export with strict=RAISE_ALL and matched the logits).
with open(os.path.join(os.path.dirname(__file__), "testdata", "megatron_core_keys.json")) as _f:
  MCORE_KEYS = json.load(_f)


@pytest.mark.parametrize("name", sorted(MCORE_KEYS["configs"]))
def test_export_holds_exactly_the_keys_megatron_core_asks_for(name, tmp_path):
  want = MCORE_KEYS["configs"][name]
  cfg = model_lib.ModelConfig(**{"num_query_groups": None, **want["model_config"]})  # MHA.
  out = str(tmp_path / "m.nemo")
  nemo.save_nemo(out, cfg, S.random_params(cfg))
  tensors, objects = stored_keys(out)
  assert tensors == want["tensors"]
  assert objects == want["objects"]


def test_export_for_megatron_core_0_14_matches_a_file_it_wrote(legacy, tmp_path):
  """0.14 with Transformer Engine also asks for core attention's `_extra_state`: the fixture
  megatron-core 0.14 wrote holds exactly the keys of a megatron_core="0.14" export."""
  out = str(tmp_path / "m.nemo")
  nemo.save_nemo(out, *legacy, megatron_core="0.14")
  assert stored_keys(out) == stored_keys(S.NEMO["mcore-torch_dist"])
  S.assert_bitwise(nemo.load_nemo(out).params, legacy.params)
  with pytest.raises(CheckpointError, match=r"megatron_core='0\.13' is not one of"):
    nemo.save_nemo(out, *legacy, megatron_core="0.13")


CONFIGS = {
    "gqa_bias_gelu": model_lib.ModelConfig(
        vocab_size=40, hidden_size=24, num_layers=2, num_attention_heads=6,
        num_query_groups=2, kv_channels=6, ffn_hidden_size=10, activation="gelu",
        normalization="layernorm", bias=True, share_embeddings_and_output_weights=False),
    "swiglu_bias": model_lib.ModelConfig(
        vocab_size=40, hidden_size=24, num_layers=2, num_attention_heads=6,
        num_query_groups=3, ffn_hidden_size=10, activation="swiglu", bias=True),
    "mha_bf16_learned": model_lib.ModelConfig(
        vocab_size=40, hidden_size=16, num_layers=3, num_attention_heads=4, num_query_groups=None,
        ffn_hidden_size=12, activation="squared_relu", normalization="layernorm1p",
        position_embedding_type="learned_absolute", max_position_embeddings=32,
        share_embeddings_and_output_weights=False, param_dtype="bfloat16"),
    "gelu_tanh_rope_half": model_lib.ModelConfig(
        vocab_size=40, hidden_size=16, num_layers=1, num_attention_heads=2,
        ffn_hidden_size=12, activation="gelu_tanh", rotary_percentage=0.5),
}


def expected_mcore(p, cfg) -> dict:
  """Megatron tensors from dpojax params by explicit per-layer, per-head loops."""
  n, g = cfg.num_attention_heads, cfg.groups
  out = {}
  for i in range(cfg.num_layers):
    a = {k: np.asarray(v[i]) for k, v in p["layers"]["attention"].items()}
    m = {k: np.asarray(v[i]) for k, v in p["layers"]["mlp"].items()}
    rows, bias = [], []
    for group in range(g):
      for h in range(group * (n // g), (group + 1) * (n // g)):
        rows.append(a["query"][:, h, :].T)
        bias.append(a["query_bias"][h] if cfg.bias else None)
      for name in ("key", "value"):
        rows.append(a[name][:, group, :].T)
        bias.append(a[name + "_bias"][group] if cfg.bias else None)
    layer = {"self_attention.linear_qkv.weight": np.concatenate(rows),
             "self_attention.linear_proj.weight": a["out"].reshape(-1, cfg.hidden_size).T,
             "mlp.linear_fc1.weight": (np.concatenate([m["fc1"][:, 0].T, m["fc1"][:, 1].T])
                                       if cfg.gated else m["fc1"].T),
             "mlp.linear_fc2.weight": m["fc2"].T}
    if cfg.bias:
      layer["self_attention.linear_qkv.bias"] = np.concatenate(bias)
      layer["self_attention.linear_proj.bias"] = a["out_bias"]
      layer["mlp.linear_fc1.bias"] = m["fc1_bias"].reshape(-1)
      layer["mlp.linear_fc2.bias"] = m["fc2_bias"]
    for k, v in layer.items():
      out[f"model.decoder.layers.{i}.{k}"] = v
  return out


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_layout_and_round_trip_of_other_architectures(name, tmp_path):
  cfg = CONFIGS[name]
  params = S.random_params(cfg)
  out = str(tmp_path / "m.nemo")
  nemo.save_nemo(out, cfg, params)
  # What is on disk matches megatron's layout, built here head by head.
  with nemo_archive.Archive(out) as archive:
    stored = nemo_weights._read_torch_dist(archive, "model_weights/")  # pylint: disable=protected-access
  for key, want in expected_mcore(params, cfg).items():
    layer, rest = int(key.split(".")[3]), key.split(".", 4)[4]
    got = stored["model.decoder.layers." + rest][layer]
    assert got.dtype == want.dtype and np.array_equal(got, want), key
  cfg2, params2, tokenizer = nemo.load_nemo(out)
  assert cfg2 == cfg and tokenizer is None
  S.assert_bitwise(params2, params)


# --- Other containers and legacy layouts -----------------------------------------------------


def test_gzip_tar_and_extracted_folder(legacy, tmp_path):
  gz = str(tmp_path / "old.nemo")
  write_tar(gz, read_members(S.NEMO["legacy-ckpt"]), gz=True)
  S.assert_bitwise(nemo.load_nemo(gz).params, legacy.params)
  folder = tmp_path / "extracted"
  with tarfile.open(S.NEMO["mcore-torch_dist"]) as tar:
    tar.extractall(folder, filter="data")
  cfg, params, tokenizer = nemo.load_nemo(str(folder), extract_dir=str(tmp_path / "tok"))
  S.assert_bitwise(params, legacy.params)
  assert tokenizer.startswith(str(tmp_path / "tok"))


def split_ranks(state: dict, tp: int, stages: list[range]) -> dict:
  """Per-rank state dicts, by megatron_change_num_partitions' rules (an independent split)."""
  ranks = {}
  for p, layers in enumerate(stages):
    for t in range(tp):
      out = {}
      for key, value in state.items():
        if not torch.is_tensor(value):
          continue
        m = re.match(r"model\.decoder\.layers\.(\d+)\.(.+)", key)
        if m and int(m.group(1)) not in layers:
          continue
        first = "embedding" in key  # Embeddings on the first stage, the head on the last.
        if not m and p != (0 if first else len(stages) - 1):
          continue
        if m:
          key = f"model.decoder.layers.{int(m.group(1)) - layers.start}.{m.group(2)}"
        if key.endswith("linear_fc1.weight"):
          gate, up = value.chunk(2)
          value = torch.cat([gate.chunk(tp)[t], up.chunk(tp)[t]])
        elif key.endswith(("linear_qkv.weight", "word_embeddings.weight")):
          value = value.chunk(tp)[t]
        elif key.endswith(("linear_proj.weight", "linear_fc2.weight")):
          value = value.chunk(tp, dim=1)[t]
        out[key] = value.clone()
      if p == len(stages) - 1 and p > 0:  # Last stage's copy of the tied output layer.
        out["model.output_layer.weight"] = state["model.embedding.word_embeddings.weight"
                                                 ].chunk(tp)[t].clone()
      ranks[t, p] = out
  return ranks


@pytest.mark.parametrize("tp,stages", [(2, [range(0, 5)]), (2, [range(0, 3), range(3, 5)])])
def test_tensor_and_pipeline_parallel_rank_files_are_merged(legacy, tp, stages, tmp_path):
  members = read_members(S.NEMO["legacy-ckpt"])
  del members["./model_weights.ckpt"]
  members = with_yaml(members, tensor_model_parallel_size=tp,
                      pipeline_model_parallel_size=len(stages))
  for (t, p), state in split_ranks(legacy_state(), tp, stages).items():
    name = f"mp_rank_{t:02d}" if len(stages) == 1 else f"tp_rank_{t:02d}_pp_rank_{p:03d}"
    members[f"./{name}/model_weights.ckpt"] = torch_bytes(state)
  path = str(tmp_path / "ranks.nemo")
  write_tar(path, members)
  cfg, params, _ = nemo.load_nemo(path)
  assert cfg == legacy.config
  S.assert_bitwise(params, legacy.params)


def test_non_mcore_legacy_key_names(legacy, tmp_path):
  renames = [("model.embedding.", "model.language_model.embedding."),
             ("model.decoder.final_layernorm.", "model.language_model.encoder.final_layernorm."),
             ("model.decoder.layers.", "model.language_model.encoder.layers."),
             ("self_attention.linear_qkv.layer_norm_", "input_layernorm."),
             ("mlp.linear_fc1.layer_norm_", "post_attention_layernorm."),
             ("self_attention.linear_qkv.", "self_attention.query_key_value."),
             ("self_attention.linear_proj.", "self_attention.dense."),
             ("mlp.linear_fc2.", "mlp.dense_4h_to_h.")]
  state = {}
  for key, value in legacy_state().items():
    if not torch.is_tensor(value):
      continue
    for old, new in renames:
      key = key.replace(old, new)
    if key.endswith("mlp.linear_fc1.weight"):  # Non-fast swiglu: gate and up apart.
      gate, up = value.chunk(2)
      state[key.replace("linear_fc1", "dense_h_to_4h")] = gate.clone()
      state[key.replace("linear_fc1", "dense_h_to_4h_2")] = up.clone()
    else:
      state[key] = value
  state["model.language_model.rotary_pos_emb.inv_freq"] = torch.ones(4)
  members = with_yaml(read_members(S.NEMO["legacy-ckpt"]), mcore_gpt="false",
                      activation="swiglu")
  members["./model_weights.ckpt"] = torch_bytes(state)
  path = str(tmp_path / "nonmcore.nemo")
  write_tar(path, members)
  S.assert_bitwise(nemo.load_nemo(path).params, legacy.params)


# --- Errors ----------------------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_tensors_are_all_listed(tmp_path):
  state = legacy_state()
  state["model.embedding.extra.weight"] = torch.zeros(3)
  state["model.decoder.final_layernorm.weight"] = torch.zeros(63)
  members = with_yaml(read_members(S.NEMO["legacy-ckpt"]),
                      share_embeddings_and_output_weights="false")
  members["./model_weights.ckpt"] = torch_bytes(state)
  path = str(tmp_path / "bad.nemo")
  write_tar(path, members)
  with pytest.raises(CheckpointError) as e:
    nemo.load_nemo(path)
  msg = str(e.value)
  assert path in msg
  assert "missing tensors: model.output_layer.weight" in msg
  assert "unexpected tensors: model.embedding.extra.weight" in msg
  assert "model.decoder.final_layernorm.weight: (63,), expected (64,)" in msg


def test_missing_layer_tensor_is_named(tmp_path):
  state = legacy_state()
  del state["model.decoder.layers.2.mlp.linear_fc2.weight"]
  members = read_members(S.NEMO["legacy-ckpt"])
  members["./model_weights.ckpt"] = torch_bytes(state)
  path = str(tmp_path / "bad.nemo")
  write_tar(path, members)
  with pytest.raises(CheckpointError, match=r"missing tensors: model\.decoder\.layers\.2\.mlp"
                     r"\.linear_fc2\.weight"):
    nemo.load_nemo(path)


def test_unsupported_config_names_file_line_and_field(tmp_path):
  members = with_yaml(read_members(S.NEMO["mcore-zarr"]), activation="geglu")
  line = members["./model_config.yaml"].decode().splitlines().index("activation: geglu") + 1
  path = str(tmp_path / "bad.nemo")
  write_tar(path, members)
  with pytest.raises(CheckpointError) as e:
    nemo.load_nemo(path)
  assert f"{path}!model_config.yaml:{line}: activation: 'geglu' is not supported" in str(e.value)


# --- Safety ----------------------------------------------------------------------------------


def _tar_with(path, base_members: dict, bad: tarfile.TarInfo):
  with tarfile.open(path, "w:") as tar:
    for name, data in base_members.items():
      info = tarfile.TarInfo(name)
      info.size = len(data)
      tar.addfile(info, io.BytesIO(data))
    tar.addfile(bad, io.BytesIO(b"x" * bad.size) if bad.isfile() else None)


@pytest.mark.parametrize("kind", ["dotdot", "absolute", "symlink", "hardlink", "fifo"])
def test_unsafe_tar_members_are_refused(kind, tmp_path):
  target = tmp_path / "target"
  outside = tmp_path / "evil.txt"
  bad = tarfile.TarInfo({"dotdot": "./../evil.txt", "absolute": str(outside)}.get(
      kind, "./model_weights.ckpt"))
  if kind in ("dotdot", "absolute"):
    bad.size = 1
  elif kind == "symlink":
    bad.type, bad.linkname = tarfile.SYMTYPE, "/etc/passwd"
  elif kind == "hardlink":
    bad.type, bad.linkname = tarfile.LNKTYPE, "./model_config.yaml"
  else:
    bad.type = tarfile.FIFOTYPE
  members = read_members(S.NEMO["legacy-ckpt"])
  if kind in ("symlink", "hardlink", "fifo"):
    del members["./model_weights.ckpt"]
  path = str(tmp_path / "bad.nemo")
  _tar_with(path, members, bad)
  with pytest.raises(CheckpointError, match="refusing tar member"):
    nemo.load_nemo(path, extract_dir=str(target))
  assert not outside.exists() and not target.exists()


def test_pickle_payload_in_model_weights_is_not_run(tmp_path):
  marker = tmp_path / "pwned"
  members = read_members(S.NEMO["legacy-ckpt"])
  members["./model_weights.ckpt"] = torch_bytes(
      {"model.embedding.word_embeddings.weight": Evil(marker)})
  path = str(tmp_path / "bad.nemo")
  write_tar(path, members)
  with pytest.raises(CheckpointError) as e:
    nemo.load_nemo(path, extract_dir=str(tmp_path / "t"))
  assert not marker.exists()
  # What was refused and where; never torch's advice to retry with weights_only=False.
  assert re.fullmatch(
      re.escape(f"{path}!model_weights.ckpt: refused to unpickle: Trying to load unsupported "
                "GLOBAL ") + r"(posix|os)\.system whose module (posix|os) is blocked \(only "
      r"tensors and plain containers are loaded; anything else could run code\)", str(e.value))


def test_pickle_refusal_keeps_what_and_drops_torchs_advice():
  # torch < 2.5's wording: the refused global, then how to allow-list it.
  old = pickle.UnpicklingError(
      "Weights only load failed. This file can still be loaded, to do so you have two options"
      "\n\t(1) Re-running `torch.load` with `weights_only` set to `False` will likely succeed, "
      "but it can result in arbitrary code execution. Do it only if you got the file from a "
      "trusted source.\n\t(2) Alternatively, to load with `weights_only=True` please check the "
      "recommended steps in the following error message.\n\tWeightsUnpickler error: "
      "Unsupported global: GLOBAL posix.system was not an allowed global by default. Please "
      "use `torch.serialization.add_safe_globals([system])` to allowlist this global if you "
      "trust this class/function.")
  assert nemo_weights._torch_refusal(old) == (  # pylint: disable=protected-access
      "Unsupported global: GLOBAL posix.system was not an allowed global by default")


def test_pickle_payload_in_dist_checkpoint_metadata_is_not_run(tmp_path):
  marker = tmp_path / "pwned"
  members = read_members(S.NEMO["mcore-torch_dist"])
  members["./model_weights/.metadata"] = pickle.dumps(Evil(marker))
  path = str(tmp_path / "bad.nemo")
  write_tar(path, members)
  with pytest.raises(CheckpointError, match=r"refusing to unpickle (posix|os)\.system"):
    nemo.load_nemo(path)
  assert not marker.exists()


def test_pickle_payload_in_a_tensor_chunk_is_not_run(legacy, tmp_path):
  marker = tmp_path / "pwned"
  out = str(tmp_path / "ok.nemo")
  nemo.save_nemo(out, *legacy)
  folder = tmp_path / "x"
  with tarfile.open(out) as tar:
    tar.extractall(folder, filter="data")
  evil = torch_bytes(Evil(marker))
  (folder / "model_weights" / "__evil.distcp").write_bytes(evil)
  md_path = folder / "model_weights" / ".metadata"
  md = pickle.loads(md_path.read_bytes())  # Our own export: plain pickle is fine here.
  key = next(k for k in md.storage_data if k.fqn == "model.embedding.word_embeddings.weight")
  info = md.storage_data[key]
  info.relative_path, info.offset, info.length = "__evil.distcp", 0, len(evil)
  md_path.write_bytes(pickle.dumps(md))
  with pytest.raises(CheckpointError, match=r"__evil\.distcp@0 \(model\.embedding\.word_emb"
                     r"eddings\.weight\): refused to unpickle: Trying to load unsupported "
                     r"GLOBAL (posix|os)\.system") as e:
    nemo.load_nemo(str(folder))
  assert "weights_only" not in str(e.value)
  assert not marker.exists()


def test_extra_state_and_common_pickles_are_never_unpickled(legacy, tmp_path):
  marker = tmp_path / "pwned"
  members = read_members(S.NEMO["mcore-zarr"])
  evil = torch_bytes(Evil(marker))
  for name in members:
    if "_extra_state/" in name or name.endswith("common.pt"):
      members[name] = evil
  path = str(tmp_path / "evil_extras.nemo")
  write_tar(path, members)
  S.assert_bitwise(nemo.load_nemo(path).params, legacy.params)
  assert not marker.exists()
