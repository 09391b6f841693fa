"""Default DPO run: a small GPT trained from scratch on the shipped toy preference data.

Runs on a laptop CPU in a few minutes and needs nothing outside the repository.
"""

import os

import ml_collections

_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "dpojax", "assets")


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()

  c.model = m = ml_collections.ConfigDict()
  m.vocab_size = 384  # >= the tokenizer's vocabulary.
  m.hidden_size = 64  # Model width D.
  m.num_layers = 2  # Transformer blocks.
  m.num_attention_heads = 4  # Query heads.
  m.num_query_groups = 2  # Key/value heads (GQA); None = one per query head.
  m.kv_channels = None  # Head dim; None = hidden_size // heads.
  m.ffn_hidden_size = 192  # MLP width F.
  m.activation = "swiglu"  # gelu | gelu_tanh | squared_relu | swiglu.
  m.normalization = "rmsnorm"  # layernorm | layernorm1p | rmsnorm.
  m.layernorm_epsilon = 1e-5  # Norm epsilon.
  m.position_embedding_type = "rope"  # rope | learned_absolute.
  m.rotary_percentage = 1.0  # Fraction of each head's channels that RoPE rotates.
  m.rotary_base = 10000.0  # RoPE theta.
  m.max_position_embeddings = 512  # Table size for learned_absolute positions.
  m.bias = False  # Biases on linear layers.
  m.share_embeddings_and_output_weights = True  # Tied output layer.
  m.init_method_std = 0.02  # Normal init std for random init.
  m.param_dtype = "float32"  # Master parameter dtype.
  m.dtype = "float32"  # Compute dtype (bfloat16 on GPU).
  m.remat = "none"  # Activation checkpointing: none | full | dots.

  c.dpo = d = ml_collections.ConfigDict()
  d.beta = 0.1  # KL penalty: implicit reward = beta * (policy logp - reference logp).

  c.logprob = ml_collections.ConfigDict()
  c.logprob.impl = "xla"  # Per-token log-prob implementation.

  c.train = t = ml_collections.ConfigDict()
  t.max_steps = 200  # Optimizer steps.
  t.global_batch_size = 16  # Pairs per optimizer step.
  t.micro_batch_size = 8  # Pairs per forward/backward; the rest is accumulated.
  t.learning_rate = 1e-3  # Peak learning rate.
  t.warmup_steps = 10  # Linear warmup steps.
  t.min_lr_ratio = 0.1  # Final cosine learning rate as a fraction of the peak.
  t.weight_decay = 0.0  # AdamW decoupled weight decay.
  t.adam_b1 = 0.9  # Adam beta1.
  t.adam_b2 = 0.98  # Adam beta2.
  t.adam_eps = 1e-8  # Adam epsilon.
  t.grad_clip = 1.0  # Global-norm gradient clipping; 0 disables it.
  t.seed = 0  # Seed for init and data order.
  t.log_interval = 25  # Steps between train metric records.

  c.data = dt = ml_collections.ConfigDict()
  dt.train_path = os.path.join(_ASSETS, "toy_prefs_train.jsonl")  # NeMo-format JSONL.
  dt.val_path = os.path.join(_ASSETS, "toy_prefs_val.jsonl")  # Validation JSONL.
  dt.tokenizer_path = os.path.join(_ASSETS, "tokenizer.model")  # SentencePiece model.
  dt.max_seq_length = 64  # Tokens per sequence; longer pairs are dropped (and counted).
  dt.template = "plain"  # Prompt template.
  dt.add_bos = True  # Start each sequence with BOS.
  dt.append_eos = True  # End each response with EOS.
  dt.default_chosen_reward = 1.0  # Reward when a record has no chosen_reward.
  dt.default_rejected_reward = 0.0  # Reward when a record has no rejected_reward.

  c.eval = e = ml_collections.ConfigDict()
  e.interval = 25  # Steps between validations (and at the end).
  e.max_batches = -1  # Validation batches per evaluation; -1 = the whole file.
  e.at_start = True  # Validate before the first step.

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.interval = 100  # Steps between checkpoints (and at the end).
  ck.max_to_keep = 3  # Checkpoints kept.
  ck.async_save = True  # Write checkpoints in the background.
  ck.keep_best = True  # Also keep the best checkpoint by validation loss under <workdir>/best.

  c.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel replicas; -1 = the devices the other axes leave.
  mesh.fsdp = 1  # Parameter/optimizer-state sharding (ZeRO-3 style) over this many devices.
  mesh.tensor = 1  # Tensor parallelism: heads, MLP hidden and vocab split this many ways.
  return c
