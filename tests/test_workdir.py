"""The run config a workdir keeps for generate/evaluate: writing, finding, reading, errors."""

import json
import os

import pytest

from dpojax import model as model_lib
from dpojax import pretrained
from dpojax import workdir

from conftest import tiny_config


def test_write_config_resolves_model_and_tokenizer(tmp_path):
  config = tiny_config()
  config.init.path = "/somewhere/model.nemo"
  cfg = model_lib.ModelConfig(vocab_size=512, hidden_size=64, num_layers=5, num_query_groups=2)
  path = workdir.write_config(str(tmp_path), config, cfg, "tok.model")
  assert path == str(tmp_path / "run_config.json")
  back = workdir.read_config(path)
  assert workdir.model_config(back) == cfg
  assert back.data.tokenizer_path == os.path.abspath("tok.model")
  assert back.init.path == "/somewhere/model.nemo" and back.dpo.beta == config.dpo.beta
  assert list(back.dpo.losses) == list(config.dpo.losses)


def test_find_config_from_step_folders_only(tmp_path):
  (tmp_path / "checkpoints" / "12").mkdir(parents=True)
  (tmp_path / "best" / "9").mkdir(parents=True)
  (tmp_path / "export").mkdir()
  assert workdir.find_config(str(tmp_path)) is None
  # A Hugging Face config.json is not a run config; a dpojax one is.
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
  assert workdir.find_config(str(tmp_path)) is None
  (tmp_path / "config.json").write_text(tiny_config().to_json_best_effort())
  plain = str(tmp_path / "config.json")
  for sub in ("", "checkpoints", "checkpoints/12", "best/9"):
    assert workdir.find_config(str(tmp_path / sub)) == plain, sub
  assert workdir.find_config(str(tmp_path / "export")) is None  # e.g. export.to inside it.
  workdir.write_config(str(tmp_path), tiny_config())
  assert workdir.find_config(str(tmp_path / "checkpoints" / "12")) == str(
      tmp_path / "run_config.json")  # Preferred: it is resolved.


def test_errors_name_the_file(tmp_path):
  bad = tmp_path / "run_config.json"
  bad.write_text('{"model": {},\n "data": }')
  with pytest.raises(workdir.WorkdirError, match=rf"{bad}:2: not valid JSON"):
    workdir.read_config(str(bad))
  bad.write_text('{"model": {}, "data": {}, "train": {}}')
  with pytest.raises(workdir.WorkdirError, match="no 'init' section"):
    workdir.read_config(str(bad))
  with pytest.raises(workdir.WorkdirError, match="no such file or folder"):
    pretrained.load_policy(str(tmp_path / "nowhere"), extract_dir=str(tmp_path))
  config = tiny_config()
  config.model.activation = "tanh"
  (tmp_path / "run_config.json").write_text(config.to_json_best_effort())
  with pytest.raises(workdir.WorkdirError, match=r"model.activation='tanh'"):
    workdir.model_config(workdir.read_config(str(tmp_path / "run_config.json")))


def test_init_from_the_old_spelling_still_reads_with_one_warning(tmp_path, caplog):
  """`init.from` (a Python keyword: --config.init.from=... cannot parse) is now init.path;
  run configs and .py files that say init.from still load the same checkpoint."""
  import logging  # pylint: disable=g-import-not-at-top

  from stories260k import HF_DIR  # pylint: disable=g-import-not-at-top

  d = json.loads(tiny_config().to_json_best_effort())
  del d["init"]["path"]
  d["init"]["from"] = HF_DIR  # As run_config.json of an earlier version holds it.
  (tmp_path / "run_config.json").write_text(json.dumps(d))
  old = workdir.read_config(str(tmp_path / "run_config.json"))
  with caplog.at_level(logging.WARNING):
    assert workdir.init_path(old) == HF_DIR
    assert workdir.init_path(old) == HF_DIR
    loaded = pretrained.load_pretrained(old, str(tmp_path / "x"))
  assert caplog.text.count("init.from is now init.path") == 1
  new = tiny_config()
  new.init.path = HF_DIR
  want = pretrained.load_pretrained(new, str(tmp_path / "y"))
  assert loaded.config == want.config and loaded.config.hidden_size != new.model.hidden_size
  assert workdir.init_path(tiny_config()) == ""
  new.init["from"] = "/elsewhere"
  with pytest.raises(ValueError, match="init.path=.* and init.from=/elsewhere .* disagree"):
    workdir.init_path(new)
