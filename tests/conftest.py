"""Shared fixtures: a tiny config over the shipped toy data, so compilation stays cheap."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "tests", "testdata")


def load_default_config():
  spec = importlib.util.spec_from_file_location("dpo_gpt", os.path.join(ROOT, "configs", "dpo_gpt.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def tiny_config():
  c = load_default_config()
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
  c.eval.interval = 3
  c.eval.max_batches = 2
  c.checkpoint.interval = 3
  c.checkpoint.async_save = False
  return c


@pytest.fixture
def config():
  return tiny_config()
