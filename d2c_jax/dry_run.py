"""`launch/search.py --dry_run=TOPOLOGY`: compile every executable a search run would use, for a
TPU slice (libtpu's deviceless compilation: no TPU needed) or for this machine (`cpu`), and say
whether it fits before anyone pays for the hardware.

Shapes: N adapters, L layers, R rank, G member slots of a merge, S sequence bucket, P packed
tokens, Q loss positions, n examples per task, V vocab.

What is read: config.json, the safetensors headers of the base model and of every adapter (never
the tensor data: they may be absent), the adapter configs, the tokenizer and the examples. The
base weights and the prepared merge inputs enter as shapes only (`jax.ShapeDtypeStruct`s with the
shardings a run places them in); the prepared inputs' shapes come from `merge.prepared_shapes`
(every operator's layout, without holding its [N, L, ...] arrays). A `scoring.Scorer` built from those shapes takes every decision of a real
run (sequence buckets, `--batch_size=auto` at the topology's memory, chunks) and lists its
executables; each is lowered and compiled, and XLA's memory analysis gives the per-device bytes.
--workdir is never read, created or touched.

Time estimates are estimates: model FLOPs counted from the shapes (`model_flops`; XLA's
cost_analysis counts a loop body once, so its figure is printed per loop iteration) against the
chip's published peak bfloat16 FLOP/s, and the bytes the executable reads and writes against its
published HBM bandwidth.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from typing import Any, Iterator, Sequence

import numpy as np

from d2c_jax.errors import UserError

GIB = float(1 << 30)


@dataclasses.dataclass(frozen=True)
class Topology:
    """A TPU slice as libtpu's topology description names it, with the HBM per device that
    libtpu's compiler takes as available (its "exceeds available HBM" figure, libtpu 0.0.42) and
    the chip's published peak bfloat16 FLOP/s and HBM bandwidth."""

    name: str  # get_topology_desc's topology_name, e.g. "v5e:2x4"
    chips_per_host: tuple[int, int, int]
    chip_config: str  # "default"; v4: "megacore" (one device per chip, as on a v4 VM)
    hbm_bytes: float
    peak_flops: float
    hbm_bandwidth: float


_V4 = dict(chip_config="megacore", hbm_bytes=30.75 * GIB, peak_flops=275e12, hbm_bandwidth=1228e9)
_V5E = dict(chip_config="default", hbm_bytes=15.75 * GIB, peak_flops=197e12, hbm_bandwidth=819e9)
_V5P = dict(chip_config="default", hbm_bytes=95.74 * GIB, peak_flops=459e12, hbm_bandwidth=2765e9)
_V6E = dict(chip_config="default", hbm_bytes=31.25 * GIB, peak_flops=918e12, hbm_bandwidth=1640e9)
TOPOLOGIES: dict[str, Topology] = {
    "v4-8": Topology("v4:2x2x1", (2, 2, 1), **_V4),
    "v5e-1": Topology("v5e:1x1", (1, 1, 1), **_V5E),
    "v5e-4": Topology("v5e:2x2", (2, 2, 1), **_V5E),
    "v5e-8": Topology("v5e:2x4", (2, 4, 1), **_V5E),
    "v5e-16": Topology("v5e:4x4", (2, 2, 1), **_V5E),
    "v5p-8": Topology("v5p:2x2x1", (2, 2, 1), **_V5P),
    "v6e-8": Topology("v6e:2x4", (2, 4, 1), **_V6E),
}
CPU = "cpu"
INSTALL_HINT = "the TPU dry run needs libtpu: pip install -e '.[tpu]' (or pip install 'jax[tpu]')"


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[list[str]]:
    """libtpu writes a few lines to file descriptor 2 when it starts without a TPU (accelerator
    type, worker hostnames); they are kept back and handed to the caller (shown on failure)."""
    sys.stderr.flush()
    saved = os.dup(2)
    kept: list[str] = []
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield kept
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            kept.append(tmp.read().decode(errors="replace"))


def topology_devices(topology: str) -> tuple[list[Any], float, float, float]:
    """(devices, bytes per device, peak FLOP/s, bandwidth bytes/s) of a named topology; `cpu`:
    this machine's first CPU device, the scorer's memory figure and a measured matmul peak."""
    import jax

    if topology == CPU:
        from d2c_jax import scoring

        return jax.devices("cpu")[:1], float(scoring.device_memory_bytes()), _cpu_peak_flops(), 20e9
    if topology not in TOPOLOGIES:
        raise UserError(None, f"--dry_run={topology}: unknown topology; use one of "
                        f"{', '.join(list(TOPOLOGIES) + [CPU])}")
    import importlib.util

    if importlib.util.find_spec("libtpu") is None:
        raise UserError(None, INSTALL_HINT)
    from jax.experimental import topologies

    t = TOPOLOGIES[topology]
    # Nothing touches a chip: several compiling processes need not take libtpu's one-process lock.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    with _quiet_stderr() as noise:
        try:
            desc = topologies.get_topology_desc(topology_name=t.name, platform="tpu", chip_config_name=t.chip_config,
                                                chips_per_host_bounds=t.chips_per_host, num_slices=1,
                                                wrap=(False, False, False))
        except Exception as e:  # noqa: BLE001 - libtpu's own error, in one line
            error = e
        else:
            error = None
    if error is not None:
        raise UserError(None, f"libtpu could not describe {topology} ({' '.join(str(error).split())[:300]}; "
                        f"libtpu said: {' '.join(''.join(noise).split())[:300]})")
    return list(desc.devices), t.hbm_bytes, t.peak_flops, t.hbm_bandwidth


def _cpu_peak_flops() -> float:
    """float32 matmul FLOP/s of this machine, measured (1024^3, best of 5): the scorer's dots."""
    import jax
    import jax.numpy as jnp

    x = jnp.ones((1024, 1024), jnp.float32)
    f = jax.jit(lambda a: a @ a)
    f(x).block_until_ready()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        f(x).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return 2 * 1024**3 / best


# ----------------------------------------------------------------------------- inputs, headers only


def adapter_layout(adapters_dir: str, cfg: Any) -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """(task names, adapted modules, common rank R) of every adapter, from adapter_config.json
    and the safetensors headers (names and shapes checked as loading checks them; no data)."""
    from d2c_jax import hf_io, lora
    from d2c_jax.models.config import LORA_MODULES, module_shapes

    names = tuple(lora.adapter_subdirs(adapters_dir))
    dims = module_shapes(cfg)
    modules: set[str] = set()
    rank = 0
    for name in names:
        adapter_dir = os.path.join(adapters_dir, name)
        config = lora.read_adapter_config(adapter_dir)
        path = lora._weights_path(adapter_dir)
        header = hf_io.read_header(path)
        if not header:
            raise UserError(path, "contains no tensors")
        r = int(config["r"])
        for (layer, m, f), key in lora._parse_keys(header, path, cfg.num_layers).items():
            d_in, d_out = dims[m]
            want = (r, d_in) if f == "A" else (d_out, r)
            if header[key][1] != want:
                raise UserError(path, f"tensor {key} has shape {header[key][1]} but the base model and r={r} need "
                                f"{want} ({m}: d_in={d_in}, d_out={d_out}); was this adapter trained for another "
                                "base model?")
            modules.add(m)
        rank = max(rank, r)
    return names, tuple(m for m in LORA_MODULES if m in modules), rank


def prepared_shapes(cfg: Any, n: int, modules: Sequence[str], rank: int, method: str, density: float,
                    seed: int, output_rank: int | None) -> Any:
    """The merge.Prepared of N rank-R adapters on `modules` as ShapeDtypeStructs, without its
    arrays (`merge.prepared_shapes`; `seed` draws DARE's drops, which change values, not shapes)."""
    from d2c_jax import merge
    from d2c_jax.models.config import module_shapes

    dims = module_shapes(cfg)
    return merge.prepared_shapes({m: dims[m] for m in modules}, n, cfg.num_layers, rank, method,
                                 out_rank=output_rank, density=density)


# ----------------------------------------------------------------------------- FLOPs and rows


def model_flops(cfg: Any, modules: Sequence[str], rank: int, *, tokens: int, loss_positions: int,
                examples: int, seq: int, lm_head_rows: int | None = None) -> float:
    """Model FLOPs of one evaluation as the executable computes it: every projection (and its
    LoRA) on `tokens` rows, the last layer's output projection and MLP on `loss_positions` rows
    when they are fewer (the packed path), attention's two [S, S] products on the `examples`
    × `seq` grid, and the LM head on `lm_head_rows` rows (default: the loss positions)."""
    from d2c_jax.models.config import module_shapes

    dims = module_shapes(cfg)
    lora = lambda m: 2 * rank * (dims[m][0] + dims[m][1]) if m in modules else 0  # noqa: E731
    per_row = {m: 2 * dims[m][0] * dims[m][1] + lora(m) for m in dims}
    attn_in = sum(per_row[m] for m in ("q_proj", "k_proj", "v_proj"))
    after = sum(per_row[m] for m in ("o_proj", "gate_proj", "up_proj", "down_proj"))
    attention = 2 * 2 * cfg.num_heads * cfg.head_dim * examples * seq * seq
    last_rows = min(tokens, loss_positions)
    layers = cfg.num_layers * (tokens * attn_in + attention) + (cfg.num_layers - 1) * tokens * after + last_rows * after
    head = 2 * cfg.hidden_size * cfg.vocab_size * (loss_positions if lm_head_rows is None else lm_head_rows)
    return float(layers + head)


@dataclasses.dataclass
class Row:
    name: str
    batch: int  # requests per call (0: a merge)
    argument_bytes: int
    temp_bytes: int
    total_bytes: int
    flops_per_eval: float  # model FLOPs (0: a merge)
    xla_flops: float  # cost_analysis, per device, loop bodies counted once
    seconds_per_eval: float  # estimate
    compile_seconds: float
    share: float  # fraction of the run's evaluations this executable scores


def _memory(compiled: Any) -> tuple[int, int, int]:
    m = compiled.memory_analysis()
    args, temp = int(m.argument_size_in_bytes), int(m.temp_size_in_bytes)
    total = args + temp + int(m.output_size_in_bytes) - int(m.alias_size_in_bytes) + int(
        getattr(m, "generated_code_size_in_bytes", 0) or 0)
    return args, temp, total


def _exhausted_bytes(error: Exception) -> int | None:
    """The temporaries the TPU compiler needed when it refused for lack of HBM ("Ran out of
    memory on HBM, the total memory required for HLO temporaries (19.97G) exceeds ..."), else None."""
    import re

    m = re.search(r"RESOURCE_EXHAUSTED.*?temporaries \(([\d.]+)([KMGT])\)", str(error), re.S)
    if m is None:
        return None
    return int(float(m.group(1)) * (1 << (10 * " KMGT".index(m.group(2)))))


def _argument_bytes(args: Any) -> int:
    """Bytes one device holds of abstract arguments laid out by their shardings."""
    import jax

    total = 0
    for x in jax.tree.leaves(args):
        shape = tuple(x.shape) if x.sharding is None else x.sharding.shard_shape(tuple(x.shape))
        total += int(np.prod(shape)) * np.dtype(x.dtype).itemsize
    return total


def _xla_flops(compiled: Any) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return float((cost or {}).get("flops", 0.0))


def executable_flops(scorer: Any, exe: Any, modules: Sequence[str], rank: int) -> float:
    """Model FLOPs of one evaluation of a scoring executable, at its bucket's shapes."""
    from d2c_jax import packing

    tasks = np.flatnonzero(scorer.seq_bucket_of == exe.seq)
    sub = scorer.task_batch(exe.seq)
    n = int(sub.tokens.shape[1])
    if exe.name.startswith(("packed", "score")):  # both run the packed loss
        p, q = packing.packed_sizes(sub)
        return model_flops(scorer.cfg, modules, rank, tokens=p, loss_positions=q, examples=n, seq=exe.seq)
    grid = n * exe.seq  # the padded grid: every position through every layer and the LM head
    return model_flops(scorer.cfg, modules, rank, tokens=grid, loss_positions=grid, examples=n, seq=exe.seq)


def compile_rows(scorer: Any, exes: Sequence[Any], modules: Sequence[str], rank: int, peak_flops: float,
                 bandwidth: float, devices: int, log: Any = None) -> list[Row]:
    """Compiles each executable; one Row each (memory analysis, FLOPs, estimated seconds)."""
    rows = []
    tasks_per_seq = {sb: int((scorer.seq_bucket_of == sb).sum()) for sb in set(scorer.seq_bucket_of.tolist())}
    for exe in exes:
        if log:
            log(f"compiling {exe.name} ...")
        t0 = time.perf_counter()
        lowered = exe.jitted.lower(*exe.args, **exe.static)
        try:
            compiled = lowered.compile()
        except Exception as e:  # noqa: BLE001 - the TPU compiler refuses what cannot fit HBM
            temp = _exhausted_bytes(e)
            if temp is None:
                raise
            args = _argument_bytes(exe.args)
            rows.append(Row(exe.name, exe.requests, args, temp, args + temp, 0.0, 0.0, 0.0,
                            time.perf_counter() - t0, 0.0))
            continue
        seconds = time.perf_counter() - t0
        args, temp, total = _memory(compiled)
        flops = executable_flops(scorer, exe, modules, rank) if exe.requests else 0.0
        # Bytes a call moves per device (estimate): its arguments read once, its temporaries
        # written and read once.
        call_seconds = max(exe.requests * flops / devices / peak_flops, (args + 2 * temp) / bandwidth)
        rows.append(Row(exe.name, exe.requests, args, temp, total, flops, _xla_flops(compiled),
                        call_seconds / max(exe.requests, 1), seconds,
                        tasks_per_seq.get(exe.seq, 0) / scorer.num_tasks if exe.requests else 0.0))
    return rows


# ----------------------------------------------------------------------------- the dry run


def run_evaluations(cfg: Any, num_adapters: int) -> int:
    """Evaluations a run may cost at most: two per proposal per chain per iteration (a d2c
    search; a baseline: its partition's N), the random start's N and the all-in-one N."""
    s = cfg.engine_settings()
    search = 2 * s.iterations * s.population * s.proposals if cfg.strategy in ("d2c",) else num_adapters
    return search + num_adapters * (2 if cfg.all_in_one_reference else 1)


def dry_run(cfg: Any, topology: str, out: Any = None) -> int:
    """Compiles every executable of the run described by `cfg` for `topology`, prints one row
    each and the verdict line; returns the exit status (0 fits, 1 does not fit)."""
    out = out or sys.stdout
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    from d2c_jax import data, hf_io, scoring
    from d2c_jax import sharding as sharding_lib
    from d2c_jax.models.config import load_config
    from d2c_jax.pipeline import model_shards, resolve_suite
    from d2c_jax.search import check_num_clusters

    devices, device_bytes, peak, bandwidth = topology_devices(topology)
    if cfg.suite:
        cfg = resolve_suite(cfg)
    for flag in ("base_model", "adapters_dir", "data_dir"):
        if not getattr(cfg, flag):
            raise UserError(None, f"--{flag} is required")
    settings = cfg.engine_settings()
    model_cfg = load_config(cfg.base_model)
    t0 = time.perf_counter()
    hf_io.check_params_headers(cfg.base_model, model_cfg)
    names, modules, rank = adapter_layout(cfg.adapters_dir, model_cfg)
    check_num_clusters(settings.num_clusters, len(names))
    data.check_tasks_match(cfg.data_dir, names)
    tokenizer = hf_io.load_tokenizer(cfg.base_model)
    task_data = data.load_task_data(cfg.data_dir, names, tokenizer, split="search",
                                     examples_per_task=cfg.examples_per_task, max_seq_len=cfg.max_seq_len,
                                     chat_template=cfg.chat_template)
    prepared = prepared_shapes(model_cfg, len(names), modules, rank, cfg.merge, cfg.density, cfg.search.seed,
                               cfg.output_rank or None)
    log(f"dry run {topology}: inputs read in {time.perf_counter() - t0:.1f} s (headers only); compiling for "
        f"{len(devices)} {devices[0].device_kind} device(s)")
    params = hf_io.param_shape_tree(model_cfg, cfg.dtype)
    mesh = None
    if topology != CPU:
        shards = model_shards(cfg, model_cfg, len(names), modules, rank, len(devices), device_bytes)
        if cfg.model_shards == "auto":
            log(f"dry run {topology}: --model_shards=auto chose {shards} device(s) per model replica")
        mesh = sharding_lib.make_mesh(num_candidate_shards=len(devices) // shards, devices=devices)
    batch_size = "auto" if cfg.scorer_batch_size == "auto" else int(cfg.scorer_batch_size)
    scorer = scoring.Scorer(params, model_cfg, prepared, task_data, batch_size=batch_size, mesh=mesh,
                            device_bytes=int(device_bytes), batched=None if mesh is not None else False)
    largest = len(names) if cfg.all_in_one_reference else len(names) - settings.num_clusters + 1
    exes = scorer.executables(scorer.member_buckets(largest))
    weights = final_merge_weights(cfg, len(names), settings.num_clusters, prepared.num_layers)
    tuned_factors = (cfg.tune_weights or cfg.tune_during_search) and cfg.tune.granularity == "factors"
    # merged/ is written with the scorer's merges (unbatched, unit weights: above) or, for tuned
    # factors, as they are: no final merge
    if (scorer.batched or weights is not None) and not tuned_factors:
        exes.append(final_merge_executable(prepared, len(names), settings.num_clusters, devices[0], weights,
                                           scorer if scorer.batched else None))
    if cfg.tune_weights or cfg.tune_during_search:
        exes.append(tune_step_executable(scorer, prepared, task_data, cfg.tune, settings.num_clusters, mesh))
    rows = compile_rows(scorer, exes, modules, rank, peak, bandwidth, len(devices), log)
    print(table(rows, scorer.batch_size), file=out)
    verdict, status = verdict_line(topology, rows, device_bytes, run_evaluations(cfg, len(names)), scorer.batched)
    print(verdict, file=out, flush=True)
    return status


def final_merge_weights(cfg: Any, n: int, k: int, num_layers: int) -> tuple[int, ...] | None:
    """The shape of the weights the final merge is given (pipeline.write_merged): tuned merge
    weights [K, N] or per layer [K, N, L]; None where it merges at unit weights (no tuning, or
    tuned factors, which are written as they are)."""
    tuned = cfg.tune_weights or cfg.tune_during_search
    if not tuned or cfg.tune.granularity == "factors":
        return None
    return (k, n, num_layers) if cfg.tune.granularity == "layer" else (k, n)


def final_merge_executable(prepared: Any, n: int, k: int, device: Any, weights: tuple[int, ...] | None = None,
                           scorer: Any = None) -> Any:
    """The final merge of the K clusters as the pipeline runs it (tune.merged_clusters, each
    cluster over its members gathered into one member bucket), at the bucket of the largest
    cluster a partition of N into K can have (N - K + 1 members: smaller buckets hold less).
    With a `scorer` on a mesh: on the mesh, the prepared inputs as that scorer placed them (split
    over "model"); else every prepared input on `device`. `weights`: the shape of the tuned merge
    weights ([K, N] or [K, N, L]; None: unit weights)."""
    import jax

    from d2c_jax import sharding as sharding_lib
    from d2c_jax import tune
    from d2c_jax.scoring import Executable

    mesh = None if scorer is None else scorer.mesh
    g = tune.final_member_bucket(n - k + 1, n)
    if mesh is None:
        one = jax.sharding.SingleDeviceSharding(device)
        placed = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=one), prepared)
        jitted, where = tune._merge_members, one
    else:
        placed, jitted, where = scorer.placed_prepared, tune.merge_members_on(mesh), sharding_lib.replicated(mesh)
        if weights is not None:  # padded to the scorer's adapter slots (tune.merged_clusters)
            weights = (weights[0], placed.num_adapters) + tuple(weights[2:])
    spec = lambda shape, dtype: jax.ShapeDtypeStruct(shape, dtype, sharding=where)  # noqa: E731
    args = (placed, spec((k, g), np.int32), spec((k, g), np.bool_), spec((k,), np.bool_),
            None if weights is None else spec(weights, np.float32))
    name = f"final merge k{k} g{g}" + ("" if weights is None else f" weighted {'x'.join(map(str, weights))}")
    return Executable(name, jitted, args, {}, 0, 0)


def tune_step_executable(scorer: Any, prepared: Any, task_data: Any, settings: Any, k: int, mesh: Any) -> Any:
    """One optimiser step of --tune_weights (tune.py's train_step; granularity scale: one loss call of
    its search, on the unit merges) as the pipeline calls it: the base weights placed as the scorer
    places them, the prepared inputs (built in host memory) replicated, the examples split over
    "cand" (tune.place_examples), at the pipeline's example chunk, rematerialised where
    tune.needs_remat says so."""
    import jax
    import jax.numpy as jnp

    from d2c_jax import sharding as sharding_lib
    from d2c_jax import tune
    from d2c_jax.scoring import Executable

    rep = None if mesh is None else sharding_lib.replicated(mesh)

    def placed(tree: Any) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep), tree)

    def examples(batch: Any) -> Any:
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=rep if mesh is None else tune.example_sharding(mesh, x.shape)), batch)

    n = len(task_data.names)
    fit, held, _, _ = tune.split_examples(task_data, settings.holdout)
    remat = tune.needs_remat(scorer.cfg, fit)
    fns = tune.step_functions(scorer.cfg, settings, k, scorer.example_chunk(n, task_data.tokens_tns.shape[-1]), remat)
    part_n = jax.ShapeDtypeStruct((n,), jnp.int32)
    if settings.granularity == "scale":  # a search, not steps: the loss of c [K, 1] times the unit merges
        unit_k = jax.eval_shape(fns.merged, prepared, jax.ShapeDtypeStruct((k, 1), jnp.float32), part_n)
        args = (scorer.placed_params, placed(unit_k), placed(jax.ShapeDtypeStruct((k, 1), jnp.float32)),
                examples(fit), placed(part_n))
        return Executable(f"tune step k{k} (scale{', remat' if remat else ''})", fns.losses, args, {}, 0, 0)
    if settings.granularity == "factors":
        theta = jax.eval_shape(fns.merged, prepared, jax.ShapeDtypeStruct((k, n), jnp.float32), part_n)
    else:
        layers = (prepared.num_layers,) if settings.granularity == "layer" else ()
        theta = jax.ShapeDtypeStruct((k, n) + layers, jnp.float32)
    opt_state = jax.eval_shape(fns.init, theta)
    args = (scorer.placed_params, placed(prepared), examples(fit), examples(held), placed(part_n), placed(theta),
            placed(opt_state))
    name = f"tune step k{k} ({settings.granularity}{', remat' if remat else ''})"
    return Executable(name, fns.train_step, args, {}, 0, 0)


def table(rows: Sequence[Row], batch_size: int) -> str:
    w = max([24] + [len(r.name) for r in rows])
    head = (f"{'executable':<{w}} {'batch':>5} {'args GiB':>9} {'temp GiB':>9} {'total GiB':>9} "
            f"{'GFLOP/eval':>10} {'XLA GFLOP/iter':>14} {'est. ms/eval':>12} {'compile s':>9}")
    lines = [head]
    for r in rows:
        lines.append(f"{r.name:<{w}} {r.batch or '-':>5} {r.argument_bytes / GIB:>9.2f} {r.temp_bytes / GIB:>9.2f} "
                     f"{r.total_bytes / GIB:>9.2f} {r.flops_per_eval / 1e9 if r.batch else 0:>10.1f} "
                     f"{r.xla_flops / 1e9:>14.1f} {r.seconds_per_eval * 1e3 if r.batch else 0:>12.2f} "
                     f"{r.compile_seconds:>9.1f}")
    lines.append(f"batch size (--batch_size=auto or as given): {batch_size} requests per call; "
                 "ms/eval and the run's seconds are estimates (model FLOPs at the chip's peak, bytes at its HBM "
                 "bandwidth)")
    return "\n".join(lines)


def verdict_line(topology: str, rows: Sequence[Row], device_bytes: float, evaluations: int,
                 batched: bool) -> tuple[str, int]:
    """The last line, and the exit status (1: does not fit)."""
    worst = max(rows, key=lambda r: r.total_bytes)
    peak = f"peak {worst.total_bytes / GIB:.2f} GiB per device of {device_bytes / GIB:.2f}"
    if worst.total_bytes > device_bytes:
        over = (worst.total_bytes - device_bytes) / GIB
        return f"dry run {topology}: does not fit, {peak} ({worst.name}: {over:.2f} GiB over)", 1
    scoring_rows = [r for r in rows if r.batch]
    per_eval = sum(r.seconds_per_eval * r.share for r in scoring_rows)
    if not batched:  # one merge per distinct mask: at most one per evaluation
        per_eval += max((r.seconds_per_eval for r in rows if not r.batch), default=0.0)
    return (f"dry run {topology}: fits, {peak} ({worst.name}), estimated {per_eval:.4g} s per evaluation, "
            f"{per_eval * evaluations:.4g} s for the run"), 0
