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


@pytest.fixture(scope="session", autouse=True)
def _temp_folders_under_pytest(tmp_path_factory):
  """Temp folders the code makes for itself (e.g. a tokenizer unpacked from a .nemo loaded
  without `extract_dir`, which the caller owns) go under pytest's own, rotated, base folder."""
  import tempfile  # pylint: disable=g-import-not-at-top

  old = tempfile.tempdir
  tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
  yield
  tempfile.tempdir = old
