"""Two real processes on localhost (jax.distributed, gloo CPU collectives) train together and
match the single-process run."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import portpicker
import pytest

from dpojax.train.metrics import TIMING_METRICS
from conftest import ROOT

SCRIPT = textwrap.dedent("""
    import json, sys
    sys.path.insert(0, "tests")
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from conftest import tiny_config
    from dpojax.train import loop, sharding

    workdir, addr, nproc, pid = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    config = tiny_config()
    config.train.max_steps = 4
    config.eval.interval = 2
    config.checkpoint.interval = 2
    if nproc > 1:
      config.distributed.coordinator_address = addr
      config.distributed.num_processes = nproc
      config.distributed.process_id = pid
    sharding.maybe_initialize_distributed(config.distributed)
    out = loop.run(config, workdir)
    params = multihost_utils.process_allgather(out["state"].params, tiled=True)
    if jax.process_index() == 0:
      np.savez(workdir + "/params.npz", *[np.asarray(x) for x in jax.tree.leaves(params)])
      print("DEVICES", jax.device_count(), jax.process_count())
""")


def launch(workdir, nproc):
  # 127.0.0.1, not localhost (which may resolve to ::1 first), and no proxy variables: gRPC
  # would route the coordinator connection through a proxy and hang distributed.initialize.
  addr = f"127.0.0.1:{portpicker.pick_unused_port()}"
  env = {k: v for k, v in os.environ.items() if "_proxy" not in k.lower()}
  env.update(JAX_PLATFORMS="cpu", NO_GRPC_PROXY="*")
  env.pop("XLA_FLAGS", None)
  os.makedirs(workdir, exist_ok=True)
  logs = [(open(f"{workdir}.{i}.out", "w+"), open(f"{workdir}.{i}.err", "w+")) for i in range(nproc)]
  # Files, not pipes: a process blocked on a full pipe would stall the others at a barrier.
  procs = [subprocess.Popen([sys.executable, "-c", SCRIPT, workdir, addr, str(nproc), str(i)],
                            cwd=ROOT, env=env, stdout=out, stderr=err, text=True)
           for i, (out, err) in enumerate(logs)]
  codes = [p.wait(timeout=600) for p in procs]
  texts = []
  for out, err in logs:
    out.seek(0), err.seek(0)
    texts.append((out.read(), err.read()))
    out.close(), err.close()
  # Every process's tail: the first to fail is not always the one that timed out.
  report = "\n".join(f"--- process {i} exit {c}:\n{e[-3000:]}"
                      for i, (c, (_, e)) in enumerate(zip(codes, texts)))
  assert codes == [0] * nproc, report
  return texts[0][0]


def read(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    records = [json.loads(l) for l in f]
  params = np.load(os.path.join(workdir, "params.npz"))
  return records, [params[k] for k in sorted(params.files, key=lambda k: int(k.split("_")[1]))]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  assert "DEVICES 1 1" in launch(one, 1)
  assert "DEVICES 2 2" in launch(two, 2)
  rec1, params1 = read(one)
  rec2, params2 = read(two)
  assert [(r["step"], r["split"]) for r in rec1] == [(r["step"], r["split"]) for r in rec2]
  for a, b in zip(rec1, rec2):
    for key, value in a.items():
      if key not in TIMING_METRICS and key != "split":
        assert b[key] == pytest.approx(value, rel=1e-5, abs=1e-5), (a["step"], key)
  for a, b in zip(params1, params2):
    np.testing.assert_allclose(a, b, atol=1e-5)
  assert sorted(os.listdir(os.path.join(two, "checkpoints"))) == ["2", "4"]
