"""Shared fixtures: a tiny config over the shipped toy data, so compilation stays cheap."""

import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "tests", "testdata")


def load_config_file(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def load_default_config():
  return load_config_file(os.path.join(ROOT, "configs", "dpo_gpt.py"))


TINY_CONFIG = os.path.join(ROOT, "tests", "configs", "tiny.py")


def tiny_config():
  return load_config_file(TINY_CONFIG)


@pytest.fixture
def config():
  return tiny_config()
