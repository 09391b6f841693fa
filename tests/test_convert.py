"""dpojax.convert: format detection, load/save dispatch and the command line."""

import os
import subprocess
import sys
import tarfile

import pytest

from dpojax import convert
from dpojax.checkpoint import nemo
import stories260k as S


def test_detect_format(tmp_path):
  assert convert.detect_format(S.HF_DIR) == "hf"
  for path in S.NEMO.values():
    assert convert.detect_format(path) == "nemo"
  with tarfile.open(S.NEMO["mcore-zarr"]) as tar:
    tar.extractall(tmp_path / "extracted", filter="data")
  assert convert.detect_format(str(tmp_path / "extracted")) == "nemo"
  assert convert.detect_format(str(tmp_path)) is None
  assert not convert.is_checkpoint(str(tmp_path))
  with pytest.raises(convert.CheckpointError, match="no such .nemo file"):
    convert.load(str(tmp_path / "missing.nemo"))
  with pytest.raises(convert.CheckpointError, match="neither a .nemo file"):
    convert.load(str(tmp_path))


def test_every_source_gives_the_same_model():
  cfg, params, _ = convert.load(S.HF_DIR)
  for path in S.NEMO.values():
    cfg2, params2, _ = convert.load(path)
    assert cfg2 == cfg
    S.assert_bitwise(params2, params, path)


def test_cli_round_trip_nemo_hf_nemo(tmp_path, capsys):
  hf_dir, out = str(tmp_path / "hf"), str(tmp_path / "back.nemo")
  assert convert.main(["--from", S.NEMO["mcore-torch_dist"], "--to", hf_dir]) == 0
  assert "Wrote" in capsys.readouterr().out
  assert convert.main(["--from", hf_dir, "--to", out]) == 0
  again = str(tmp_path / "again.nemo")
  assert convert.main(["--from", S.NEMO["mcore-zarr"], "--to", again]) == 0
  source = convert.load(S.NEMO["mcore-torch_dist"])
  for path in (hf_dir, out, again):
    cfg, params, tokenizer = convert.load(path, extract_dir=str(tmp_path / "tok"))
    assert cfg == source.config
    S.assert_bitwise(params, source.params, path)
    assert open(tokenizer, "rb").read() == open(source.tokenizer_path, "rb").read()
  # nemo -> nemo keeps the source's training-side keys; the weights become torch_dist.
  config = nemo.read_nemo_config(again)
  assert config["optim"]["name"] == "fused_adam" and config["dist_ckpt_format"] == "torch_dist"


def test_cli_reports_bad_input(tmp_path, capsys):
  bad = tmp_path / "bad.nemo"
  bad.write_bytes(b"not a tar")
  assert convert.main(["--from", str(bad), "--to", str(tmp_path / "x")]) == 1
  err = capsys.readouterr().err
  assert err.startswith("error: ") and str(bad) in err
  assert not os.path.exists(tmp_path / "x")


def test_python_dash_m_entry_point(tmp_path):
  out = str(tmp_path / "m.nemo")
  proc = subprocess.run([sys.executable, "-m", "dpojax.convert", "--from", S.HF_DIR,
                         "--to", out], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "260,032 parameters" in proc.stdout
  cfg, params, _ = convert.load(out)
  S.assert_bitwise(params, convert.load(S.HF_DIR).params)
