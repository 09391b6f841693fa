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
  m.attention_block = 32  # Causal attention in query tiles that skip later keys; 0 = dense.
  # auto (flash on GPU, else xla) | xla (dense/tiled) | flash (segment-skipping GPU kernel) |
  # sparse (segment-skipping tiles in XLA: for packed rows on CPU).
  m.attention_impl = "auto"
  m.scan_unroll = 2  # Layers per scan step; num_layers unrolls all (faster, longer compile).
  # Options of the Hugging Face families (set by init.path's checkpoint; off here).
  m.qkv_bias = False  # Biases on q, k, v only (Qwen2).
  m.qk_norm = False  # Norm over head_dim on each q and k head (Qwen3, Gemma 3).
  m.post_norms = False  # Norms on attention/MLP outputs before the residual add (Gemma 2/3).
  m.scale_embeddings = False  # Embeddings times sqrt(hidden_size) (Gemma).
  m.query_pre_attn_scalar = ml_collections.config_dict.placeholder(float)  # Scale 1/sqrt(x).
  m.attention_softcap = 0.0  # Attention logits -> c * tanh(l / c); 0 = none (Gemma 2).
  m.final_logit_softcap = 0.0  # Output logits -> c * tanh(z / c); 0 = none (Gemma 2).
  m.sliding_window = 0  # Sliding layers see keys < this many positions back; 0 = none.
  m.layer_types = ml_collections.config_dict.placeholder(tuple)  # Per layer full/sliding_attention.
  m.rotary_base_local = ml_collections.config_dict.placeholder(float)  # RoPE theta, sliding layers.
  m.rope_scaling = "none"  # RoPE scaling: none | linear | dynamic | llama3 | yarn (HF rope_type).
  m.rope_scaling_factor = 1.0  # Its factor (linear, dynamic, llama3, yarn).
  m.rope_low_freq_factor = 1.0  # llama3: wavelengths over original / this are scaled.
  m.rope_high_freq_factor = 4.0  # llama3: wavelengths under original / this are kept.
  m.rope_original_max_positions = 8192  # llama3, yarn: original_max_position_embeddings.
  m.rope_attention_factor = 1.0  # yarn: cos and sin times this (HF attention_factor).
  m.rope_yarn_beta_fast = 32.0  # yarn: rotations that bound the kept high frequencies.
  m.rope_yarn_beta_slow = 1.0  # yarn: rotations that bound the interpolated low ones.
  m.rope_yarn_truncate = True  # yarn: ramp ends rounded to whole dimensions.
  m.qk_norm_all_heads = False  # qk_norm over each token's whole q and k (OLMoE).
  m.attention_sinks = False  # A learned per-head logit in each softmax denominator (gpt-oss).
  # Mixture of experts (model/moe.py; set by init.path's checkpoint; num_experts 0 = dense).
  m.moe = e = ml_collections.ConfigDict()
  e.num_experts = 0  # Experts per MoE layer; 0 = a dense MLP everywhere.
  e.top_k = 2  # Experts each token is routed to.
  e.ffn_hidden_size = 0  # Each expert's F; 0 = ffn_hidden_size.
  e.router = "softmax_topk"  # softmax_topk (Mixtral, Qwen, OLMoE) | topk_softmax (gpt-oss).
  e.norm_topk_prob = False  # Renormalise the k routing weights to sum to 1.
  e.router_bias = False  # Bias on the router logits (gpt-oss).
  e.expert_bias = False  # Biases on the experts' projections (gpt-oss).
  e.activation = "swiglu"  # swiglu | swiglu_clamped (gpt-oss).
  e.swiglu_alpha = 1.702  # swiglu_clamped: gate * sigmoid(alpha * gate).
  e.swiglu_limit = 7.0  # swiglu_clamped: the clamp.
  e.shared_expert_size = 0  # F of a sigmoid-gated shared expert (Qwen2-MoE); 0 = none.
  e.dense_layers = ()  # Layers with a dense MLP instead (Qwen2-MoE's mlp_only_layers).
  e.router_aux_loss_coef = 0.0  # The checkpoint's load-balancing loss weight (config.json).
  # The load-balancing loss's weight in this run's loss; None = router_aux_loss_coef; 0 = none.
  e.aux_loss_coef = ml_collections.config_dict.placeholder(float)
  e.z_loss_coef = 0.0  # Router z-loss weight (mean logsumexp(router logits)^2).
  e.freeze_router = False  # Routers get no update (common when fine-tuning MoE models).
  e.grouped_impl = "auto"  # Expert matmul: auto (ragged on GPU/TPU, scan on CPU) | ragged (lax.ragged_dot) | scan (tiles, one product each) | tiles (one batched product).
  e.tile = 128  # tiles: rows per tile (each expert's rows padded to a multiple of it).

  c.init = ml_collections.ConfigDict()
  c.init.path = ""  # .nemo file, Hugging Face folder or dpojax workdir; "" = random init.
  c.init.checkpoint_tokenizer = True  # Use the tokenizer stored with init.path, if any.

  c.export = ml_collections.ConfigDict()
  c.export.to = ""  # After training: write the policy as a .nemo (path ends .nemo) or HF folder.

  c.dpo = d = ml_collections.ConfigDict()
  d.beta = 0.1  # KL penalty: implicit reward = beta * (policy logp - reference logp).
  d.ref_policy_kl_penalty = ml_collections.config_dict.placeholder(float)  # NeMo's name for beta.
  d.preference_loss = "dpo"  # dpo|ipo|rpo_sq|rpo_bwd_kl|rpo_fwd_kl, a TRL name, simpo|cpo|orpo|kto..: docs/losses.md.
  d.losses = ()  # Weighted list instead of preference_loss, e.g. ('sigmoid', 'bco_pair', 'sft').
  d.loss_weights = ()  # One weight per dpo.losses entry; () = 1.0 each.
  d.preference_average_log_probs = False  # Average log-ratios over response tokens (else sum).
  d.sft_average_log_probs = ml_collections.config_dict.placeholder(bool)  # None: as above.
  d.gt_reward_scale = 1.0  # RPO: g = scale * (chosen_reward - rejected_reward) from the data.
  d.preference_loss_weight = 1.0  # Total = this * preference loss + sft_loss_weight * SFT loss.
  d.sft_loss_weight = 0.0  # SFT term: minus the chosen response log-prob (NeMo).
  d.label_smoothing = 0.0  # cDPO/robust/exo_pair/aot label noise eps.
  d.f_divergence_type = "reverse_kl"  # reverse_kl | forward_kl | js_divergence | alpha_divergence.
  d.f_alpha_divergence_coef = 0.5  # alpha for alpha_divergence.
  d.use_weighting = False  # WPO: weight each pair by its policy's mean token probability.
  d.ld_alpha = ml_collections.config_dict.placeholder(float)  # LD-DPO: weight past shared length.
  d.discopop_tau = 0.05  # DiscoPOP temperature.
  d.reference_free = False  # Reference log-probs = 0 (no reference forward pass).
  d.bco_baseline = "none"  # bco_pair reward baseline: none | micro_batch_mean.
  # SimPO / CPO / ORPO (reference-free: no reference model at all) and KTO: TRL's defaults.
  d.simpo_gamma = 0.5  # simpo: target reward margin gamma (TRL CPOConfig.simpo_gamma).
  d.cpo_alpha = 1.0  # simpo/cpo*: weight of the chosen response's NLL term (TRL cpo_alpha).
  d.alphapo_alpha = 0.0  # simpo/cpo*: AlphaPO reward r = (1 - p^-alpha)/alpha; 0 = log p (TRL alpha).
  d.desirable_weight = 1.0  # kto/apo_zero_unpaired: weight of desirable examples' losses.
  d.undesirable_weight = 1.0  # kto/apo_zero_unpaired: weight of undesirable examples' losses.

  c.lora = lo = ml_collections.ConfigDict()
  lo.enabled = False  # Train LoRA adapters only; the base stays frozen (NeMo peft_scheme=lora).
  lo.targets = ("attention_qkv",)  # attention_qkv|_dense, mlp_fc1|_fc2, attention, mlp, all.
  lo.rank = 32  # Adapter rank r (NeMo adapter_dim).
  lo.alpha = ml_collections.config_dict.placeholder(float)  # Scale = alpha / rank; None = rank.
  lo.dropout = 0.0  # Training dropout on the adapter output (NeMo's 'post' position).

  c.reference = rf = ml_collections.ConfigDict()
  rf.mode = "auto"  # auto (lora_base with LoRA, else copy) | copy | lora_base | precomputed | none.
  rf.sync_steps = 0  # TR-DPO: every this many steps ref <- alpha*policy + (1-alpha)*ref; 0 = off.
  rf.sync_alpha = 0.6  # TR-DPO mixing weight alpha (1.0 = hard copy of the policy).
  rf.cache_dir = ""  # precomputed: reference log-prob cache; "" = ~/.cache/dpojax/reference.

  c.logprob = ml_collections.ConfigDict()
  c.logprob.impl = "auto"  # auto (chunked on CPU) | xla (full logits) | chunked | pallas | triton.
  c.logprob.token_block = 0  # Tokens per logits tile; 0 = impl default (chunked 1024, kernels 64).
  c.logprob.vocab_block = 0  # Vocab rows per tile; 0 = impl default (chunked 4096, kernels 128).

  c.train = t = ml_collections.ConfigDict()
  t.max_steps = 200  # Optimizer steps.
  t.global_batch_size = 16  # Pairs per optimizer step.
  t.micro_batch_size = 8  # Pairs per forward/backward; the rest is accumulated.
  t.learning_rate = 1e-3  # Peak learning rate.
  t.warmup_steps = 10  # Linear warmup steps.
  t.lr_schedule = "cosine"  # After warmup: cosine (to min_lr_ratio) | linear (to 0, TRL) | constant
  t.min_lr_ratio = 0.1  # Final cosine learning rate as a fraction of the peak.
  t.weight_decay = 0.0  # AdamW decoupled weight decay.
  t.adam_b1 = 0.9  # Adam beta1.
  t.adam_b2 = 0.98  # Adam beta2.
  t.adam_eps = 1e-8  # Adam epsilon.
  t.grad_clip = 1.0  # Global-norm gradient clipping; 0 disables it.
  t.seed = 0  # Seed for init and data order.
  t.log_interval = 25  # Steps between train metric records.
  t.max_consecutive_nonfinite = 5  # Stop after this many non-finite steps in a row.
  t.peak_flops = 0.0  # MFU denominator in FLOP/s; 0 = time a matmul at start (no MFU on CPU); -1 = no MFU.

  c.data = dt = ml_collections.ConfigDict()
  dt.train_path = os.path.join(_ASSETS, "toy_prefs_train.jsonl")  # JSONL[.gz], .parquet, a folder of Parquet shards, a datasets.save_to_disk folder, or a dir from `python -m dpojax.pack`.
  dt.val_path = os.path.join(_ASSETS, "toy_prefs_val.jsonl")  # Validation data (the same kinds).
  dt.tokenizer_path = os.path.join(_ASSETS, "tokenizer.model")  # SentencePiece .model, tokenizer.json, or a folder holding either (init.path's own by default).
  dt.format = "auto"  # auto | nemo | trl | hh-rlhf (auto: from the first record's fields).
  dt.shuffle = True  # A new pair order every epoch; False: the file's order (TRL/NeMo sequential)
  dt.boundary = "joint"  # Prompt+response tokenized together, as TRL/NeMo | apart (each alone).
  dt.max_seq_length = 64  # Tokens per sequence (prompt + response); see data.truncation.
  dt.truncation = "drop"  # Over-long pairs: drop | truncate_prompt_left | truncate_response_right.
  dt.on_error = "raise"  # Bad records: raise (file:line: field) | skip (counted, summarised).
  dt.template = "auto"  # auto (the tokenizer folder's own Jinja chat template, else plain) | plain | nemo (extra_id, NeMo docs) | llama2 | chatml.
  dt.add_bos = True  # Start each sequence with BOS (template=auto: only where the template wrote none).
  dt.append_eos = True  # End each response with EOS (template=auto: only after a response holding no stop token).
  dt.packing = "batch"  # batch (each step's pairs packed into bucketed rows; batch sizes still count pairs, as TRL's) | none (two padded rows per pair) | first_fit_decreasing | first_fit_shuffle (re-packed every epoch).
  dt.pack_size = 0  # Tokens per packed row (>= 2 * max_seq_length); 0 = 2 * max_seq_length.
  dt.length_buckets = 4  # Padded batches go to the smallest of this many lengths <= max_seq_length holding their longest sequence (1 = always max_seq_length).
  dt.response_only = True  # Output layer and log-softmax only at response tokens (batches carry their positions; exact).
  dt.share_prompt = True  # Packed rows: a pair's prompt computed once, both responses branch off it (exact; not for ORPO, whose NLL reads the prompt).
  # With first_fit_* (or a packed directory), train.global_batch_size and micro_batch_size
  # count ROWS of pack_size tokens (each holds whole pairs) and the pairs per step vary
  # (metrics report num_pairs); with none and batch they count pairs.
  dt.cache_dir = ""  # Where .gz files are decompressed for random access; "" = ~/.cache/dpojax.
  dt.read_threads = 1  # Grain threads that read and collate batches.
  dt.prefetch = 2  # Batches prepared ahead of the step.
  dt.default_chosen_reward = 1.0  # Reward when a record has no chosen_reward.
  dt.default_rejected_reward = 0.0  # Reward when a record has no rejected_reward.
  dt.unpair = False  # KTO: split each pair into a desirable and an undesirable example (TRL unpair_preference_dataset).

  c.eval = e = ml_collections.ConfigDict()
  e.interval = 25  # Steps between validations (and at the end).
  e.interval_epochs = 0.0  # If > 0: validate every this fraction of an epoch (overrides interval).
  e.max_batches = -1  # Validation batches per evaluation; -1 = the whole file.
  e.at_start = True  # Validate before the first step.
  e.num_samples = 0  # Greedy answers to the first N validation prompts at each evaluation.
  e.sample_max_new_tokens = 32  # Tokens per sample answer.
  e.sample_reference = False  # Also the reference's answer to each sample prompt.
  e.sample_chosen = True  # Also the data's chosen response, beside the answers.

  c.logging = lg = ml_collections.ConfigDict()
  lg.writers = ("jsonl", "tensorboard")  # + "wandb" (pip install -e '.[wandb]') | "mlflow".
  lg.wandb = ml_collections.ConfigDict()
  lg.wandb.project = "dpojax"  # W&B project.
  lg.wandb.entity = ""  # W&B team or user; "" = your default.
  lg.wandb.name = ""  # Run name; "" = the workdir's name.
  lg.wandb.group = ""  # Groups runs in the UI (e.g. a sweep).
  lg.wandb.tags = ()  # Run tags.
  lg.wandb.mode = "online"  # online | offline (no network; `wandb sync` later) | disabled.
  lg.mlflow = ml_collections.ConfigDict()
  lg.mlflow.tracking_uri = ""  # "" = a file store in <workdir>/mlruns; or http://host:5000 ...
  lg.mlflow.experiment = "dpojax"  # Experiment name (created if missing).
  lg.mlflow.run_name = ""  # "" = the workdir's name.

  c.checkpoint = ck = ml_collections.ConfigDict()
  ck.interval = 100  # Steps between checkpoints (and at the end).
  ck.max_to_keep = 3  # Checkpoints kept.
  ck.async_save = True  # Write checkpoints in the background.
  ck.keep_best = True  # Also keep the best checkpoint by validation loss under <workdir>/best.
  ck.on_error = "stop"  # A checkpoint write fails (disk full...): stop | continue.

  c.mesh = mesh = ml_collections.ConfigDict()
  mesh.data = -1  # Data-parallel replicas; -1 = the devices the other axes leave.
  mesh.fsdp = 1  # Parameter/optimizer-state sharding (ZeRO-3 style) over this many devices.
  mesh.tensor = 1  # Tensor parallelism: heads, MLP hidden and vocab split this many ways.
  # Context parallelism: each row's tokens split this many ways (long rows; rows padded to a
  # multiple of 2 x context, two mirrored chunks per device; see ops/context_attention.py).
  mesh.context = 1
  mesh.expert = 1  # Expert parallelism (MoE models): experts split this many ways, all-to-all.

  c.distributed = dist = ml_collections.ConfigDict()
  dist.coordinator_address = ""  # host:port of process 0; "" = DPOJAX_COORDINATOR or SLURM.
  dist.num_processes = 0  # 0 = from DPOJAX_NUM_PROCESSES.
  dist.process_id = -1  # -1 = from DPOJAX_PROCESS_ID.
  dist.cpu_collectives = "gloo"  # CPU collectives for multi-process CPU runs.

  c.debug = ml_collections.ConfigDict()
  c.debug.inject_nonfinite_at = ()  # Steps whose loss is forced to NaN (tests the guard).
  return c
