"""Manual check (not a test): megatron-core loads a .nemo that dpojax wrote, strictly.

Builds a megatron-core GPTModel (local spec, CPU) from the file's model_config.yaml, loads
model_weights/ with dist_checkpointing.load + load_state_dict(strict=True), runs BOS + the
reference ids and saves the logits next to the .nemo as mcore_logits.npy (compare them with
dpojax's). Needs `pip install megatron-core==0.16.1 psutil` next to torch==2.13.0 (CPU); keep it
out of the project's environment (e.g. a venv with --system-site-packages).

  python -m dpojax.convert --from tests/testdata/stories260k/hf --to /tmp/x/export.nemo
  python tests/testdata/stories260k/check_with_megatron.py /tmp/x/export.nemo \
      tests/testdata/stories260k/reference.json
"""
import contextlib, json, os, sys, tarfile, tempfile

import numpy as np
import torch
import torch.nn.functional as F
import yaml


def main(nemo_path, reference_json):
  os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
  os.environ.setdefault("MASTER_PORT", "29541")
  torch.distributed.init_process_group("gloo", rank=0, world_size=1)
  from megatron.core import dist_checkpointing, parallel_state
  from megatron.core.models.gpt import GPTModel
  from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
  from megatron.core.tensor_parallel.random import get_cuda_rng_tracker
  from megatron.core.transformer import TransformerConfig
  parallel_state.initialize_model_parallel(1, 1)
  get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()
  torch.cuda.current_device = lambda: "cpu"

  tmp = tempfile.mkdtemp()
  with tarfile.open(nemo_path) as tar:
    tar.extractall(tmp, filter="data")
  c = yaml.safe_load(open(os.path.join(tmp, "model_config.yaml")))
  acts = {"fast-swiglu": (F.silu, True), "gelu": (F.gelu, False),
          "squared-relu": (lambda x: F.relu(x) ** 2, False)}
  act, gated = acts[c["activation"]]
  norm = {"rmsnorm": "RMSNorm", "layernorm": "LayerNorm"}[c["normalization"]]
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
  md = json.load(open(os.path.join(tmp, "model_weights", "metadata.json")))
  print("metadata.json", md)
  # The vocab comes from the tokenizer padded by make_vocab_size_divisible_by (NeMo's rule).
  import sentencepiece as spm
  tok = c["tokenizer"]["model"][len("nemo:"):]
  n = spm.SentencePieceProcessor(model_file=os.path.join(tmp, tok)).vocab_size()
  div = c["make_vocab_size_divisible_by"]
  vocab = -(-n // div) * div
  model = GPTModel(
      config=tc, transformer_layer_spec=get_gpt_layer_local_spec(normalization=norm),
      vocab_size=vocab, max_sequence_length=c["max_position_embeddings"],
      position_embedding_type=c["position_embedding_type"],
      rotary_percent=c["rotary_percentage"], rotary_base=int(c["rotary_base"]),
      share_embeddings_and_output_weights=c["share_embeddings_and_output_weights"])
  sharded = model.sharded_state_dict(prefix="model.")
  from megatron.core.dist_checkpointing.validation import StrictHandling
  state = dist_checkpointing.load(sharded, os.path.join(tmp, "model_weights"),
                                  strict=StrictHandling.RAISE_ALL)  # Exactly the keys asked for.
  result = model.load_state_dict({k[len("model."):]: v for k, v in state.items()}, strict=True)
  print("strict load: missing", result.missing_keys, "unexpected", result.unexpected_keys)
  model.eval()
  ref = json.load(open(reference_json))
  ids = torch.tensor([[1] + ref["greedy_ids"]])
  s = ids.shape[1]
  mask = ~torch.tril(torch.ones(s, s, dtype=torch.bool))[None, None]
  with torch.no_grad():
    logits = model(ids, torch.arange(s)[None], mask)
  out = logits.float().numpy()
  np.save(os.path.join(os.path.dirname(os.path.abspath(nemo_path)), "mcore_logits.npy"), out)
  agree = (out[0, :-1].argmax(-1) == ids[0, 1:].numpy()).mean()
  print("megatron-core argmax agrees with the reference at", agree, "of positions")


if __name__ == "__main__":
  main(*sys.argv[1:])
