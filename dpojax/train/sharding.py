"""Device meshes and sharding rules: one code path from one CPU to many GPU hosts.

The mesh has axes (data, fsdp, tensor, expert). Batches split their row axis over data, fsdp
and expert; parameters (and so optimizer state, which mirrors them) split their model
dimension D over fsdp, heads / MLP hidden / vocab over tensor, and the experts of MoE layers
over expert (their tokens travel there and back by all-to-all: ops/grouped.py). A dimension that a mesh axis does not divide
stays replicated, so every model runs on every mesh. XLA's SPMD partitioner inserts the
collectives; the vocab-sharded logsumexp reduces per shard and combines partial results.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

AXES = ("data", "fsdp", "tensor", "expert")
# Rows of a batch split over the data-parallel axes (expert parallelism is data parallelism
# outside the experts).
BATCH = ("data", "fsdp", "expert")

# Logical axes of each parameter, by leaf name (layer-stacked leaves have a leading None).
_RULES = {
    "embedding": ("vocab", "embed"),
    "output": ("vocab", "embed"),
    "position_embedding": (None, "embed"),
    "query": (None, "embed", "heads", None),
    "key": (None, "embed", "kv_heads", None),
    "value": (None, "embed", "kv_heads", None),
    "out": (None, "heads", None, "embed"),
    "query_bias": (None, "heads", None),
    "key_bias": (None, "kv_heads", None),
    "value_bias": (None, "kv_heads", None),
    "fc1": (None, "embed", None, "mlp"),  # Gated [L, D, 2, F]; ungated drops the 2.
    "fc1_bias": (None, None, "mlp"),
    "fc2": (None, "mlp", "embed"),
    # MoE layers (model/moe.py): experts over `expert`; inside the experts' shard_map
    # each device holds its experts whole (D and F gathered there).
    "experts_fc1": (None, "expert", "embed", None, None),
    "experts_fc2": (None, "expert", None, "embed"),
    "experts_fc1_bias": (None, "expert", None, None),
    "experts_fc2_bias": (None, "expert", None),
    "shared_fc1": (None, "embed", None, "mlp"),
    "shared_fc2": (None, "mlp", "embed"),
}
_LOGICAL_TO_MESH = {"vocab": "tensor", "heads": "tensor", "kv_heads": "tensor",
                    "mlp": "tensor", "embed": "fsdp", "expert": "expert"}


def resolve_shape(mesh_cfg, num_devices: int) -> tuple[int, ...]:
  """(data, fsdp, tensor, expert) sizes; one entry may be -1 for 'the rest of the devices'.
  mesh.expert may be absent (run configs written before it): 1."""
  sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor, mesh_cfg.get("expert", 1)]
  if sum(s == -1 for s in sizes) > 1:
    raise ValueError(f"at most one of mesh.data/fsdp/tensor/expert may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(f"mesh (data, fsdp, tensor, expert) = {tuple(sizes)} does not fit "
                     f"{num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"mesh.data*mesh.fsdp*mesh.tensor*mesh.expert = {math.prod(sizes)} but "
                     f"there are {num_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  devices = jax.devices() if devices is None else devices
  shape = resolve_shape(mesh_cfg, len(devices))
  return Mesh(np.asarray(devices).reshape(shape), AXES)


def param_spec(path: tuple, shape: tuple, mesh: Mesh) -> P:
  name = str(getattr(path[-1], "key", path[-1]))
  logical = _RULES.get(name)
  if logical is None:  # Norm scales and biases: small, replicated.
    return P()
  if name == "fc1" and len(shape) == 3:
    logical = (None, "embed", "mlp")
  if len(logical) != len(shape):
    logical = logical[len(logical) - len(shape):]
  spec = []
  for dim, axis in zip(shape, logical):
    mesh_axis = _LOGICAL_TO_MESH.get(axis)
    size = mesh.shape.get(mesh_axis, 1) if mesh_axis is not None else 1
    ok = size > 1 and dim % size == 0
    spec.append(mesh_axis if ok else None)
  return P(*spec)


def tree_shardings(tree: Any, mesh: Mesh) -> Any:
  """NamedShardings for a params tree, or any tree that mirrors it (optimizer moments)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, param_spec(path, tuple(x.shape), mesh)), tree)


def state_shardings(state: Any, mesh: Mesh) -> Any:
  """Shards every leaf by the rule of its name: Adam moments live under the same leaf names
  as the parameters, so they shard like them; scalars (step, counts) are replicated."""
  return tree_shardings(state, mesh)


def batch_shardings(batch: dict, mesh: Mesh) -> dict:
  """[A, rows, T] arrays split rows over data x fsdp; small per-pair [A, P] arrays are
  replicated, so a micro-batch needs only its rows (not its pairs) to divide the devices."""
  row = NamedSharding(mesh, P(None, BATCH))
  replicated = NamedSharding(mesh, P())
  return {k: row if np.ndim(v) == 3 else replicated for k, v in batch.items()}


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Places this process's block of a batch on the mesh as global arrays.

  The data pipeline gives each process its block of rows (axis 1) of every micro-batch, in
  process order; row arrays are assembled from the blocks. The small per-pair arrays are
  gathered from all processes and replicated.
  """
  shardings = batch_shardings(local_batch, mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if np.ndim(v) == 3:
      out[k] = jax.make_array_from_process_local_data(shardings[k], v)
    else:
      if jax.process_count() > 1:
        v = np.concatenate(list(multihost_utils.process_allgather(v)), axis=1)
      out[k] = jax.make_array_from_callback(v.shape, shardings[k], lambda i, v=v: v[i])
  return out


def maybe_initialize_distributed(dist_cfg) -> None:
  """jax.distributed from config, DPOJAX_* variables, or SLURM; call before any jax work."""
  if jax.distributed.is_initialized():
    return
  addr = dist_cfg.coordinator_address or os.environ.get("DPOJAX_COORDINATOR")
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1
  if not addr and not slurm:
    return
  if dist_cfg.cpu_collectives:  # CPU-only multi-process runs (tests, CPU clusters).
    jax.config.update("jax_cpu_collectives_implementation", dist_cfg.cpu_collectives)
  if addr:
    num = dist_cfg.num_processes or int(os.environ["DPOJAX_NUM_PROCESSES"])
    pid = dist_cfg.process_id
    pid = pid if pid >= 0 else int(os.environ["DPOJAX_PROCESS_ID"])
    jax.distributed.initialize(coordinator_address=addr, num_processes=num, process_id=pid)
  else:
    jax.distributed.initialize()  # Cluster auto-detection reads the SLURM variables.
