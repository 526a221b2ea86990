"""Device mesh, base-param partition rules and multi-host start-up.

Shapes: L layers, D model dim, F mlp dim, V vocab, H heads, K kv heads, Dh head dim.

The mesh has two axes: "cand" (data parallel over the batch of evaluation requests: each device
group merges and scores its own slice of candidates) and "model" (tensor parallel over the base
weights, for models that do not fit one device). Base params are placed by a declarative table of
regex -> PartitionSpec on their "/"-joined path; the compiler (GSPMD, Auto axes) inserts the
collectives. An axis that does not divide a dimension is dropped (that dimension is replicated).
"""

from __future__ import annotations

import os
import re
from typing import Any, Sequence

import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from d2c_jax.errors import UserError

CAND, MODEL = "cand", "model"

# First match wins. Kernels are [L, in, out]: column-parallel for the projections that fan out
# (q/k/v/gate/up), row-parallel for those that fan in (o/down), Megatron style.
PARAM_RULES: tuple[tuple[str, P], ...] = (
    (r"^embed$", P(MODEL, None)),  # [V, D], vocab-parallel
    (r"^lm_head$", P(None, MODEL)),  # [D, V], logits sharded over vocab
    (r"^layers/(q|k|v|gate|up)_proj/kernel$", P(None, None, MODEL)),  # [L, D, out]
    (r"^layers/(q|k|v)_proj/bias$", P(None, MODEL)),  # [L, out]
    (r"^layers/(o|down)_proj/kernel$", P(None, MODEL, None)),  # [L, in, D]
    (r".*", P()),  # norms, biases of row-parallel layers: replicated
)


def make_mesh(num_candidate_shards: int | None = None, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("cand", "model") mesh over all devices; `num_candidate_shards` (default: all devices)
    sets the "cand" size, the rest of the devices go to "model"."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    cand = n if num_candidate_shards is None else int(num_candidate_shards)
    if cand < 1 or n % cand:
        raise UserError(None, f"num_candidate_shards={cand} must divide the {n} devices")
    return jax.make_mesh((cand, n // cand), (CAND, MODEL), (AxisType.Auto, AxisType.Auto),
                         devices=devices)


def path_str(path: tuple[Any, ...]) -> str:
    """"layers/q_proj/kernel" from a jax tree path."""
    parts = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return "/".join(parts)


def spec_for(name: str, shape: tuple[int, ...], mesh: Mesh,
             rules: Sequence[tuple[str, P]] = PARAM_RULES) -> P:
    """The first matching rule's spec, with axes that do not divide their dimension dropped."""
    for pattern, spec in rules:
        if re.search(pattern, name):
            break
    else:
        spec = P()
    if len(spec) > len(shape):
        return P()
    out = []
    for dim, axis in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        size = 1 if axis is None else int(np.prod([mesh.shape[a] for a in np.atleast_1d(axis)]))
        out.append(axis if axis is not None and dim % size == 0 else None)
    return P(*out) if any(a is not None for a in out) else P()


def param_shardings(params: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, P]] = PARAM_RULES) -> Any:
    """A pytree of NamedSharding matching `params` (leaves may be arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(path_str(path), tuple(x.shape), mesh, rules)),
        params,
    )


def shard_params(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = PARAM_RULES) -> Any:
    """Places the base params on the mesh by the rules."""
    return jax.device_put(params, param_shardings(params, mesh, rules))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (request) axis over "cand", the rest replicated."""
    return NamedSharding(mesh, P(CAND, *([None] * (ndim - 1))))


_INITIALIZED: list[bool] = []


def initialize_distributed(
    enabled: bool | None = None,
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Starts jax.distributed for a multi-host job, only when asked to.

    Asked when `enabled` is True, a coordinator address is given, or the environment sets
    D2C_DISTRIBUTED=1 or JAX_COORDINATOR_ADDRESS. Without explicit addresses JAX auto-detects the
    cluster (TPU pods, SLURM, ...). Single-host runs need nothing. Returns whether it initialised.
    """
    if _INITIALIZED:
        return True
    if enabled is None:
        enabled = bool(coordinator_address) or os.environ.get("D2C_DISTRIBUTED") == "1" or bool(
            os.environ.get("JAX_COORDINATOR_ADDRESS")
        )
    if not enabled:
        return False
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes,
        process_id=process_id,
    )
    _INITIALIZED.append(True)
    logging.info("jax.distributed: process %d of %d, %d global devices",
                 jax.process_index(), jax.process_count(), jax.device_count())
    return True
