"""The default config shrunk for tests: a tiny model, short runs, synchronous checkpoints.

Usable from the command line too: --config=tests/configs/tiny.py.
"""

import os

from dpojax import workdir

_DEFAULT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "configs",
                        "dpo_gpt.py")


def get_config():
  c = workdir.load_config_file(_DEFAULT)
  c.model.hidden_size = 32
  c.model.num_layers = 1
  c.model.num_attention_heads = 2
  c.model.num_query_groups = 1
  c.model.ffn_hidden_size = 64
  c.data.max_seq_length = 48
  c.train.global_batch_size = 8
  c.train.micro_batch_size = 4
  c.train.max_steps = 6
  c.train.warmup_steps = 2
  c.train.log_interval = 1
  c.train.peak_flops = -1.0  # No start-up matmul measurement in tests.
  c.eval.interval = 3
  c.eval.max_batches = 2
  c.checkpoint.interval = 3
  c.checkpoint.async_save = False
  # Two padded rows per pair, as the oracles most tests compare with (TRL, transformers, slow
  # references) lay them out; the default batch-packed, shared-prompt layout is checked against
  # this one in test_buckets and runs in every CLI test of configs/dpo_gpt.py.
  c.data.packing = "none"
  c.data.share_prompt = False
  return c
