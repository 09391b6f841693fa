"""Manual probe (not a test): the keys megatron-core's GPTModel.sharded_state_dict asks for.

For each export config below: dpojax writes a .nemo, megatron-core builds a GPTModel (local
spec, CPU) from its model_config.yaml, lists `model.sharded_state_dict(prefix="model.")`
(tensor keys with global shapes; object keys as `key/shard_...`), loads the file with
`dist_checkpointing.load(..., strict=StrictHandling.RAISE_ALL)` + load_state_dict(strict=True),
and compares its logits with dpojax's. Writes megatron_core_keys.json next to this file, which
tests/test_nemo.py checks every export against (no megatron-core needed there).

Needs megatron-core next to torch==2.13.0+cpu, kept out of the project's environment:
  pip install --no-deps --target /tmp/mcore megatron-core==0.16.1 psutil
  PYTHONPATH=/tmp/mcore python tests/testdata/megatron_core_keys.py
"""
import contextlib, copy, dataclasses, json, os, sys, tarfile, tempfile, warnings

import numpy as np
import torch
import torch.nn.functional as F
import yaml

_TESTS = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.dirname(_TESTS), _TESTS]  # This checkout's dpojax; tests/stories260k.
from dpojax import model as model_lib  # pylint: disable=g-import-not-at-top
from dpojax.formats import nemo  # pylint: disable=g-import-not-at-top
import stories260k as S  # pylint: disable=g-import-not-at-top

C = model_lib.ModelConfig
CONFIGS = {  # Every switch the export has: GQA/MHA, bias, gated, norm, positions, tied head.
    "gqa_rmsnorm_swiglu_tied": C(vocab_size=64, hidden_size=32, num_layers=3,
                                 num_attention_heads=8, num_query_groups=4,
                                 ffn_hidden_size=40),
    "gqa_layernorm_gelu_bias_untied": C(
        vocab_size=40, hidden_size=24, num_layers=2, num_attention_heads=6, num_query_groups=2,
        kv_channels=6, ffn_hidden_size=10, activation="gelu", normalization="layernorm",
        bias=True, share_embeddings_and_output_weights=False),
    "gqa_rmsnorm_swiglu_bias_tied": C(vocab_size=40, hidden_size=24, num_layers=2,
                                      num_attention_heads=6, num_query_groups=3,
                                      ffn_hidden_size=10, bias=True),
    "mha_layernorm1p_sqrelu_learned_untied": C(
        vocab_size=40, hidden_size=16, num_layers=3, num_attention_heads=4, ffn_hidden_size=12,
        activation="squared_relu", normalization="layernorm1p",
        position_embedding_type="learned_absolute", max_position_embeddings=32,
        share_embeddings_and_output_weights=False),
    "mha_rmsnorm_gelu_tanh_rope_half": C(vocab_size=40, hidden_size=16, num_layers=1,
                                         num_attention_heads=2, ffn_hidden_size=12,
                                         activation="gelu_tanh", rotary_percentage=0.5),
}


def mcore_model(c: dict, vocab: int):
  from megatron.core.models.gpt import GPTModel
  from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
  from megatron.core.transformer import TransformerConfig
  gelu = (lambda x: F.gelu(x, approximate="tanh")) if c["openai_gelu"] else F.gelu
  act, gated = {"fast-swiglu": (F.silu, True), "gelu": (gelu, False),
                "squared-relu": (lambda x: F.relu(x) ** 2, False)}[c["activation"]]
  norm = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm", "layernorm1p": "LayerNorm"}[
      c["normalization"]]
  tc = TransformerConfig(
      num_layers=c["num_layers"], hidden_size=c["hidden_size"],
      num_attention_heads=c["num_attention_heads"], num_query_groups=c["num_query_groups"],
      kv_channels=c["kv_channels"], ffn_hidden_size=c["ffn_hidden_size"],
      normalization=norm, layernorm_epsilon=c["layernorm_epsilon"],
      gated_linear_unit=gated, activation_func=act, add_bias_linear=c["bias"],
      hidden_dropout=0.0, attention_dropout=0.0, use_cpu_initialization=True,
      bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
      persist_layer_norm=False, apply_rope_fusion=False, gradient_accumulation_fusion=False,
      params_dtype=torch.float32)
  return GPTModel(
      config=tc, transformer_layer_spec=get_gpt_layer_local_spec(normalization=norm),
      vocab_size=vocab, max_sequence_length=c["max_position_embeddings"],
      position_embedding_type=c["position_embedding_type"],
      rotary_percent=c["rotary_percentage"], rotary_base=int(c["rotary_base"]),
      share_embeddings_and_output_weights=c["share_embeddings_and_output_weights"])


def probe(name: str, cfg, tmp: str) -> dict:
  from megatron.core import dist_checkpointing
  from megatron.core.dist_checkpointing import ShardedObject, ShardedTensor
  from megatron.core.dist_checkpointing.dict_utils import nested_values
  from megatron.core.dist_checkpointing.mapping import apply_factories
  from megatron.core.dist_checkpointing.validation import StrictHandling
  params = S.random_params(cfg)
  path = os.path.join(tmp, name + ".nemo")
  nemo.save_nemo(path, cfg, params)
  folder = os.path.join(tmp, name)
  with tarfile.open(path) as tar:
    tar.extractall(folder, filter="data")
  c = yaml.safe_load(open(os.path.join(folder, "model_config.yaml")))
  model = mcore_model(c, cfg.vocab_size)
  sharded = model.sharded_state_dict(prefix="model.")
  built = copy.deepcopy(sharded)
  apply_factories(built)  # The gated fc1 is a factory of [gate; up] halves under one key.
  tensors, objects = {}, []
  for v in nested_values(built):
    if isinstance(v, ShardedTensor):
      shape = list(v.global_shape)
      assert tensors.setdefault(v.key, shape) == shape, (v.key, shape)
    elif isinstance(v, ShardedObject):
      objects.append(v.unique_key)
    else:
      raise TypeError(f"{name}: unexpected sharded entry {type(v)}")
  state = dist_checkpointing.load(sharded, os.path.join(folder, "model_weights"),
                                  strict=StrictHandling.RAISE_ALL)
  result = model.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=True)
  assert not result.missing_keys and not result.unexpected_keys, result
  model.eval()
  if c["layernorm_zero_centered_gamma"]:  # torch LayerNorm lacks it (same keys): add the 1.
    with torch.no_grad():
      for m in model.modules():
        if isinstance(m, torch.nn.LayerNorm):
          m.weight += 1
  ids = np.arange(1, 9, dtype=np.int64)[None] % cfg.vocab_size
  s = ids.shape[1]
  mask = ~torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]
  with torch.no_grad():
    got = model(torch.from_numpy(ids), torch.arange(s)[None], mask).float().numpy()
  h = model_lib.apply(params, cfg, ids.astype(np.int32), np.arange(s, dtype=np.int32)[None],
                      np.ones((1, s), np.int32))
  want = np.einsum("btd,vd->btv", np.asarray(h), np.asarray(model_lib.output_weight(params, cfg)))
  err = float(np.abs(got - want).max())
  print(f"{name}: {len(tensors)} tensors, {len(objects)} objects; RAISE_ALL load ok; "
        f"max |logit difference| {err:.2e}")
  assert err < 1e-4, err
  return {"model_config": {k: v for k, v in dataclasses.asdict(cfg).items()
                           if v != getattr(C(), k)},
          "tensors": dict(sorted(tensors.items())), "objects": sorted(objects)}


def main():
  os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
  os.environ.setdefault("MASTER_PORT", "29542")
  torch.distributed.init_process_group("gloo", rank=0, world_size=1)
  import megatron.core
  from megatron.core import parallel_state
  from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
  parallel_state.initialize_model_parallel(1, 1)
  get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
  torch.cuda.current_device = lambda: "cpu"
  warnings.simplefilter("ignore")
  out = {"megatron_core": megatron.core.__version__, "torch": torch.__version__,
         "spec": "get_gpt_layer_local_spec, TP=PP=1", "configs": {}}
  with tempfile.TemporaryDirectory() as tmp:
    for name, cfg in CONFIGS.items():
      out["configs"][name] = probe(name, cfg, tmp)
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "megatron_core_keys.json")
  with open(path, "w") as f:
    json.dump(out, f, indent=1)
    f.write("\n")
  print("wrote", path)


if __name__ == "__main__":
  main()
