"""Device mesh, base-param partition rules and multi-host start-up.

Shapes: L layers, D model dim, F mlp dim, V vocab, H heads, K kv heads, Dh head dim.

The mesh has two axes: "cand" (data parallel over the batch of evaluation requests: each device
group merges and scores its own slice of candidates) and "model" (tensor parallel over the base
weights, for models that do not fit one device). Base params are placed by a declarative table of
regex -> PartitionSpec on their "/"-joined path; the compiler (GSPMD, Auto axes) inserts the
collectives. An axis that does not divide a dimension is dropped (that dimension is replicated).

Multi-process (one process per host, JAX's distributed runtime): the mesh spans every process's
devices; every process loads the same host data and `put_global` builds the global arrays from
it; outputs the hosts read back are fully replicated, so every process takes identical decisions.
`barrier`, `any_process`, `from_main` and `check_same_on_all_processes` are the few collectives
the pipeline needs around that (all no-ops with one process).
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


# `--model_shards=auto`: the share of one model replica a device must hold is the base weights and
# the prepared adapters plus the copies XLA makes of replicated prepared inputs in a batched score
# call (compiled for v5e-8 at Llama-3.2-3B shapes with one device per replica: 19.6 GiB of
# temporaries against 5.5 GiB of prepared adapters, about 3.6 copies; docs/performance.md), counted
# as PREPARED_COPIES copies in all; it may fill REPLICA_SHARE of a device, the rest left to the
# requests' activations and a 20 % headroom.
PREPARED_COPIES = 5
REPLICA_SHARE = 0.6


def auto_model_shards(num_devices: int, device_bytes: float, params_bytes: int, prepared_bytes: int) -> int:
    """The fewest devices per model replica (a divisor of `num_devices`) whose share of the base
    weights and prepared adapters fits one device (above); all of them when none does. Fewer
    shards leave more devices to score candidates in parallel and need fewer collectives."""
    need = params_bytes + PREPARED_COPIES * prepared_bytes
    for m in range(1, num_devices + 1):
        if num_devices % m == 0 and need / m <= REPLICA_SHARE * device_bytes:
            return m
    return num_devices


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
    """A nested dict of NamedSharding matching `params` (leaves may be arrays or ShapeDtypeStructs),
    each by the rule of its "/"-joined path ("layers/q_proj/kernel")."""
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for("/".join(k.key for k in path), tuple(x.shape), mesh, rules)),
        params)


def shard_params(params: Any, mesh: Mesh, rules: Sequence[tuple[str, P]] = PARAM_RULES) -> Any:
    """Places the base params on the mesh by the rules (from every process's host copy); params
    already placed so (hf_io.load_params with these shardings) are returned as they are."""
    shardings = param_shardings(params, mesh, rules)
    placed = jax.tree.map(lambda x, s: isinstance(x, jax.Array) and x.sharding.is_equivalent_to(s, x.ndim),
                          params, shardings)
    if all(jax.tree.leaves(placed)):
        return params
    return put_global(params, shardings)


def prepared_spec(shape: tuple[int, ...], mesh: Mesh) -> P:
    """A prepared-merge leaf [N, ...]: its largest non-adapter axis that the "model" axis divides
    goes over "model" (merges are elementwise there); [N] vectors and the rest are replicated."""
    size = mesh.shape[MODEL]
    axes = [i for i in range(1, len(shape)) if size > 1 and shape[i] % size == 0]
    if not axes:
        return P()
    best = max(axes, key=lambda i: (shape[i], i))
    return P(*[MODEL if i == best else None for i in range(len(shape))])


def prepared_shardings(prepared: Any, mesh: Mesh) -> Any:
    """NamedShardings for every leaf of a merge.Prepared pytree (arrays or ShapeDtypeStructs)."""
    return jax.tree.map(lambda x: NamedSharding(mesh, prepared_spec(tuple(x.shape), mesh)), prepared)


def shard_prepared(prepared: Any, mesh: Mesh) -> Any:
    """Places the prepared merge inputs over "model" (not replicated: N adapters of a large
    model are as big as the model)."""
    return put_global(prepared, prepared_shardings(prepared, mesh))


def per_device_bytes(tree: Any, shardings: Any) -> int:
    """Bytes one device holds of `tree` (arrays or ShapeDtypeStructs) laid out by `shardings`
    (a matching pytree of NamedShardings): from shapes alone, no arrays needed."""
    leaves, shards = jax.tree.leaves(tree), jax.tree.leaves(shardings)
    return sum(int(np.prod(s.shard_shape(tuple(x.shape)))) * np.dtype(x.dtype).itemsize
               for x, s in zip(leaves, shards))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading (request) axis over "cand", the rest replicated."""
    return NamedSharding(mesh, P(CAND, *([None] * (ndim - 1))))


# ----------------------------------------------------------------------------- multi-process


def put_global(tree: Any, shardings: Any) -> Any:
    """Host-local values (identical on every process) -> global arrays laid out by `shardings`
    (one sharding, or a pytree of them matching `tree`).

    One process: `jax.device_put`. Several: `jax.device_put` cannot address other hosts' devices,
    so `assemble_from_host` builds each process's own shards from its full host copy.
    """
    if jax.process_count() == 1:
        return jax.device_put(tree, shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    placed = lambda x, s: isinstance(x, jax.Array) and x.sharding == s  # noqa: E731 - already global
    return jax.tree.map(lambda x, s: x if placed(x, s) else assemble_from_host(x, s), tree, shardings)


def assemble_from_host(tree: Any, shardings: Any) -> Any:
    """Every leaf as one global array: each process fills only its addressable devices' shards,
    slicing its own full host copy (`jax.make_array_from_callback`); valid on any process count."""
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)

    def put(x: Any, s: jax.sharding.Sharding) -> jax.Array:
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)


def barrier(name: str) -> None:
    """Every process waits here until all arrive (no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def any_process(flag: bool) -> bool:
    """True on every process when `flag` is True on any (e.g. a SIGTERM seen by one host), so that
    all take the same decision. A collective: every process must call it at the same point."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())


def from_main(tree: Any) -> Any:
    """Process 0's value of a pytree of host arrays (32-bit or narrower dtypes), on every process
    (a collective)."""
    if jax.process_count() == 1:
        return tree
    from jax.experimental import multihost_utils

    return jax.tree.map(np.asarray, multihost_utils.broadcast_one_to_all(tree))


def check_same_on_all_processes(tree: Any, what: str) -> None:
    """Raises on every process if the processes hold different values of `tree` (compared bit for
    bit through a sha256 of its leaves): they must have taken identical decisions."""
    if jax.process_count() == 1:
        return
    import hashlib

    from jax.experimental import multihost_utils

    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        leaf = np.ascontiguousarray(np.asarray(leaf))
        h.update(f"{leaf.dtype}{leaf.shape}".encode() + leaf.tobytes())
    digests_p32 = np.asarray(multihost_utils.process_allgather(np.frombuffer(h.digest(), np.uint8)))
    if not (digests_p32 == digests_p32[:1]).all():
        raise RuntimeError(f"the processes disagree on {what} (process {jax.process_index()} of "
                           f"{jax.process_count()}); a multi-process run must be deterministic")


_INITIALIZED: list[bool] = []
_TRUE = ("1", "true", "yes")
_FALSE = ("0", "false", "no")


def _tpu_chips_present() -> bool:
    """Whether this host has TPU chips (checked on the PCI bus, before any backend starts)."""
    try:
        from jax._src import hardware_utils

        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:  # noqa: BLE001 - private helper; without it, no auto-detection
        return False


def distributed_requested(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
) -> bool:
    """Whether to start jax.distributed: any argument given, D2C_DISTRIBUTED=1,
    JAX_COORDINATOR_ADDRESS set, or a Cloud TPU VM (whose slice JAX auto-detects);
    D2C_DISTRIBUTED=0 turns the auto-detection off."""
    if coordinator_address or num_processes is not None or process_id is not None:
        return True
    env = os.environ.get("D2C_DISTRIBUTED", "").strip().lower()
    if env in _TRUE:
        return True
    if env in _FALSE:
        return False
    return bool(os.environ.get("JAX_COORDINATOR_ADDRESS")) or _tpu_chips_present()


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    try:
        return int(value)
    except ValueError:
        raise UserError(None, f"environment variable {name}={value!r} must be an integer") from None


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    enabled: bool | None = None,
) -> bool:
    """Starts JAX's distributed runtime for a multi-process job; call before anything touches
    a device. Returns whether it is running.

    `enabled=None` decides by `distributed_requested`. Unset arguments come from the environment
    (JAX_COORDINATOR_ADDRESS, and JAX_NUM_PROCESSES / JAX_PROCESS_ID, read here) or are
    auto-detected by `jax.distributed.initialize` (TPU pod slices, SLURM, Open MPI). Nothing
    given or detected: a plain single-process run.
    """
    if _INITIALIZED or jax.distributed.is_initialized():
        return True
    if enabled is None:
        enabled = distributed_requested(coordinator_address, num_processes, process_id)
    if not enabled:
        return False
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if num_processes is not None and num_processes < 1:
        raise UserError(None, f"--num_processes={num_processes} must be >= 1")
    if num_processes is not None and process_id is not None and not 0 <= process_id < num_processes:
        raise UserError(None, f"--process_id={process_id} must be in [0, --num_processes={num_processes})")
    if num_processes == 1:  # nothing to coordinate
        return False
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator_address or None, num_processes=num_processes,
            process_id=process_id,
        )
    except (ValueError, RuntimeError, TypeError) as e:
        text = " ".join(str(e).split())[:300]
        raise UserError(None, f"cannot start the JAX distributed runtime ({type(e).__name__}: {text}); "
                        "give --coordinator_address, --num_processes and --process_id on every host, "
                        "or set D2C_DISTRIBUTED=0 for a single-process run") from None
    _INITIALIZED.append(True)
    logging.info("jax.distributed: process %d of %d, %d global devices",
                 jax.process_index(), jax.process_count(), jax.device_count())
    return True
