"""Shared fixtures: a tiny config over the shipped toy data, so compilation stays cheap."""

import os
import tempfile

import pytest

from dpojax import workdir

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTDATA = os.path.join(ROOT, "tests", "testdata")


def load_default_config():
  return workdir.load_config_file(os.path.join(ROOT, "configs", "dpo_gpt.py"))


TINY_CONFIG = os.path.join(ROOT, "tests", "configs", "tiny.py")


def tiny_config():
  return workdir.load_config_file(TINY_CONFIG)


@pytest.fixture
def config():
  return tiny_config()


@pytest.fixture(scope="session", autouse=True)
def _temp_folders_under_pytest(tmp_path_factory):
  """Temp folders the code makes for itself (e.g. a tokenizer unpacked from a .nemo loaded
  without `extract_dir`, which the caller owns) go under pytest's own, rotated, base folder."""
  old = tempfile.tempdir
  tempfile.tempdir = str(tmp_path_factory.mktemp("tempfile"))
  yield
  tempfile.tempdir = old
