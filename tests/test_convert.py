"""dpojax.convert: format detection, load/save dispatch and the command line."""

import io
import os
import subprocess
import sys
import tarfile

import pytest
import torch

from dpojax import convert
from dpojax.formats import nemo
from dpojax.formats import nemo_archive
from dpojax.formats import nemo_weights
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


class Evil:
  def __init__(self, path):
    self.path = str(path)

  def __reduce__(self):
    return (os.system, (f"touch {self.path}",))


def test_cli_reports_bad_input_in_one_line(tmp_path, capsys):
  bad = tmp_path / "bad.nemo"
  bad.write_bytes(b"not a tar")
  missing = tmp_path / "missing.nemo"
  # A .nemo whose weights are a pickle that runs a command when unpickled.
  marker, evil = tmp_path / "pwned", tmp_path / "evil.nemo"
  buf = io.BytesIO()
  torch.save({"model.embedding.word_embeddings.weight": Evil(marker)}, buf)
  with tarfile.open(S.NEMO["legacy-ckpt"]) as src, tarfile.open(evil, "w:") as dst:
    for m in src.getmembers():
      data = src.extractfile(m).read() if m.isfile() else None
      if m.name == "./model_weights.ckpt":
        data, m.size = buf.getvalue(), len(buf.getvalue())
      dst.addfile(m, io.BytesIO(data) if data is not None else None)
  cases = [
      (bad, f"error: {bad}: not a .nemo tar file (not a plain or gzip tar)"),
      (missing, f"error: {missing}: no such .nemo file or folder"),
      (evil, f"error: {evil}!model_weights.ckpt: refused to unpickle: Trying to load "
             "unsupported GLOBAL posix.system whose module posix is blocked (only tensors "
             "and plain containers are loaded; anything else could run code)")]
  for src, want in cases:
    assert convert.main(["--from", str(src), "--to", str(tmp_path / "x")]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith(want) and err.count("\n") == 1, err
    assert "Traceback" not in err and "weights_only" not in err
  assert not os.path.exists(tmp_path / "x") and not marker.exists()
  with pytest.raises(convert.CheckpointError, match="refused to unpickle"):  # --debug: raises.
    convert.main(["--from", str(evil), "--to", str(tmp_path / "x"), "--debug"])


def test_cli_megatron_core_target(tmp_path):
  """--megatron_core 0.14: the keys of the fixture megatron-core 0.14 wrote; default: none for
  core attention (0.15 and later)."""
  def extra_states(path):
    with nemo_archive.Archive(path) as archive:
      md = nemo_weights._MetadataUnpickler(  # pylint: disable=protected-access
          io.BytesIO(archive.read("model_weights/.metadata"))).load()
    return sorted(k for k in md.state_dict_metadata if "_extra_state" in k)
  old, new = str(tmp_path / "old.nemo"), str(tmp_path / "new.nemo")
  assert convert.main(["--from", S.HF_DIR, "--to", old, "--megatron_core", "0.14"]) == 0
  assert convert.main(["--from", S.HF_DIR, "--to", new]) == 0
  want = extra_states(S.NEMO["mcore-torch_dist"])
  assert len(want) == 25 and extra_states(old) == want
  assert extra_states(new) == [k for k in want if ".core_attention." not in k]


@pytest.mark.slow  # Keeps `-m "not slow"` under 3 minutes.
def test_python_dash_m_entry_point(tmp_path):
  out = str(tmp_path / "m.nemo")
  proc = subprocess.run([sys.executable, "-m", "dpojax.convert", "--from", S.HF_DIR,
                         "--to", out], capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr
  assert "260,032 parameters" in proc.stdout
  cfg, params, _ = convert.load(out)
  S.assert_bitwise(params, convert.load(S.HF_DIR).params)
