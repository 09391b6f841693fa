"""Device meshes and sharding rules: one code path from one CPU to many GPU hosts.

The mesh has axes (data, fsdp, context, tensor, expert). Batches split their row axis over
data, fsdp and expert, and (context > 1) each row's tokens over context, in the load-balanced
layout of `ops.context_attention.mirrored_order` that `global_batch` applies; parameters (and
so optimizer state, which mirrors them) split their model dimension D over fsdp, heads / MLP
hidden / vocab over tensor, and the experts of MoE layers over expert (their tokens travel
there and back by all-to-all: ops/grouped.py). A dimension that a mesh axis does not divide
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

from dpojax.errors import ConfigError
from dpojax.ops import context_attention

AXES = ("data", "fsdp", "tensor", "expert")  # The config's axes that `resolve_shape` sizes.
# The mesh's (context: mesh.context).
MESH_AXES = ("data", "fsdp", "context", "tensor", "expert")
# Rows of a batch split over the data-parallel axes (expert parallelism is data parallelism
# outside the experts).
BATCH = ("data", "fsdp", "expert")
CONTEXT = context_attention.AXIS  # Each row's tokens, when mesh.context > 1.

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
    raise ConfigError(f"at most one of mesh.data/fsdp/tensor/expert may be -1, got {sizes}")
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ConfigError(f"mesh (data, fsdp, tensor, expert) = {tuple(sizes)} does not fit "
                      f"{num_devices} devices")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ConfigError(f"mesh.data*mesh.fsdp*mesh.tensor*mesh.expert = {math.prod(sizes)} but "
                      f"there are {num_devices} devices")
  return tuple(sizes)


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """The (data, fsdp, context, tensor, expert) mesh; `mesh_cfg.context` (default 1) must
  divide the devices, and data/fsdp/tensor/expert share what it leaves."""
  devices = jax.devices() if devices is None else devices
  context = int(mesh_cfg.get("context", 1) or 1)
  if context < 1 or len(devices) % context:
    raise ConfigError(f"mesh.context={context} does not divide {len(devices)} devices")
  data, fsdp, tensor, expert = resolve_shape(mesh_cfg, len(devices) // context)
  return Mesh(np.asarray(devices).reshape(data, fsdp, context, tensor, expert), MESH_AXES)


def context_size(mesh) -> int:
  return context_attention.context_size(mesh)


def context_padded_length(t: int, c: int) -> int:
  """The row length the layout needs: T rounded up to a multiple of 2C."""
  return -(-t // (2 * c)) * (2 * c)


def to_context_layout(x, c: int, axis: int = -1):
  """Tokens in original order -> the layout's order (the length must divide by 2C)."""
  return x if c == 1 else _take(x, context_attention.mirrored_order(x.shape[axis], c), axis)


def from_context_layout(x, c: int, axis: int = -1):
  """The layout's order -> original token order."""
  return x if c == 1 else _take(
      x, np.argsort(context_attention.mirrored_order(x.shape[axis], c)).astype(np.int32), axis)


def _take(x, index, axis):
  return np.take(x, index, axis) if isinstance(x, np.ndarray) else x.take(index, axis)


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
  """[A, rows, T] arrays split rows over data x fsdp (and T over context); small per-pair [A,
  P] arrays are replicated, so a micro-batch needs only its rows (not its pairs) to divide
  the devices."""
  row = NamedSharding(mesh, P(None, BATCH, CONTEXT) if context_size(mesh) > 1
                      else P(None, BATCH))
  replicated = NamedSharding(mesh, P())
  return {k: row if np.ndim(v) == 3 else replicated for k, v in batch.items()}


def global_batch(local_batch: dict, mesh: Mesh) -> dict:
  """Places this process's block of a batch on the mesh as global arrays.

  The data pipeline gives each process its block of rows (axis 1) of every micro-batch, in
  process order; row arrays are assembled from the blocks. The small per-pair arrays are
  gathered from all processes and replicated.
  With mesh.context = C > 1, rows are first padded (segment 0, no loss) to a multiple of 2C
  tokens and put in the context layout (`to_context_layout`).
  """
  shardings = batch_shardings(local_batch, mesh)
  c = context_size(mesh)
  out = {}
  for k, v in local_batch.items():
    v = np.asarray(v)
    if np.ndim(v) == 3 and c > 1:
      t = v.shape[-1]
      v = to_context_layout(np.pad(v, [(0, 0), (0, 0), (0, context_padded_length(t, c) - t)]),
                            c)
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
