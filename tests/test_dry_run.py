"""launch/search.py --dry_run: compiles a run's executables from headers and examples alone, for
this machine (cpu) and a TPU topology (libtpu's deviceless compilation), never touching --workdir;
a run that cannot fit ends with `does not fit` and exit status 1."""

from __future__ import annotations

import glob
import os
import re
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import cli, dry_run, hf_io, lora as lora_lib, merge  # noqa: E402
from d2c_jax.errors import UserError  # noqa: E402
from d2c_jax.models.config import load_config  # noqa: E402
from d2c_jax.run_config import RunConfig  # noqa: E402
from fixtures_search_inputs import SEARCH, child_env, make_search_inputs, search_argv  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "search.py")
VERDICT = re.compile(r"^dry run (\S+): fits, peak (\d+\.\d\d) GiB per device of (\d+\.\d\d) \((.+)\), "
                     r"estimated (\S+) s per evaluation, (\S+) s for the run$")
HAS_LIBTPU = __import__("importlib").util.find_spec("libtpu") is not None


def truncate_to_headers(root: str) -> None:
    """Cuts every safetensors file under root after its header: names and shapes stay, data go."""
    for path in glob.glob(os.path.join(root, "**", "*.safetensors"), recursive=True):
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
        os.truncate(path, 8 + n)


@pytest.fixture(scope="module")
def header_only(tmp_path_factory):
    """The launch tests' tiny inputs (5 tasks, rank-4 adapters) with every tensor's data removed."""
    inputs = make_search_inputs(tmp_path_factory.mktemp("inputs"))
    truncate_to_headers(os.path.dirname(inputs["base_model"]))
    return inputs


def _dry(inputs, workdir, topology, **over):
    args = search_argv(inputs, workdir, **over) + [f"--dry_run={topology}"]
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True, env=child_env(),
                          timeout=600)


def test_headers_alone_are_read_and_the_tensor_data_are_never_needed(header_only):
    cfg = load_config(header_only["base_model"])
    hf_io.check_params_headers(header_only["base_model"], cfg)  # shapes check out from the headers
    with pytest.raises(UserError):  # the data really are gone: a real load cannot read them
        hf_io.load_params(header_only["base_model"], cfg, "float32")
    names, modules, rank = dry_run.adapter_layout(header_only["adapters_dir"], cfg)
    assert len(names) == 5 and rank == 4 and modules


def test_header_errors_name_the_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 40) + b"{not json")
    with pytest.raises(UserError, match="model.safetensors.*not a valid safetensors header"):
        hf_io.read_header(str(bad))


def test_cpu_dry_run_compiles_every_executable_and_never_creates_the_workdir(header_only, tmp_path):
    workdir = tmp_path / "never"
    out = _dry(header_only, workdir, "cpu")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    m = VERDICT.match(lines[-1])
    assert m and m.group(1) == "cpu", lines[-1]
    assert any(line.startswith("packed s") for line in lines) and any(line.startswith("merge ") for line in lines)
    assert not workdir.exists()


@pytest.mark.skipif(not HAS_LIBTPU, reason="libtpu not installed (pip install -e '.[tpu]')")
def test_tpu_dry_run_compiles_for_a_v5e_slice_and_leaves_an_existing_workdir_alone(header_only, tmp_path):
    workdir = tmp_path / "run"
    workdir.mkdir()
    (workdir / "partition.json").write_text("{}")  # a finished run of other settings: a real run refuses
    before = {p: os.stat(p).st_mtime_ns for p in [workdir, workdir / "partition.json"]}
    out = _dry(header_only, workdir, "v5e-4", batch_size=8)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    m = VERDICT.match(lines[-1])
    assert m and m.group(1) == "v5e-4" and float(m.group(3)) == 15.75, lines[-1]
    assert any(line.startswith("score r8 ") for line in lines) and any(line.startswith("final merge") for line in lines)
    assert sorted(os.listdir(workdir)) == ["partition.json"]
    assert {p: os.stat(p).st_mtime_ns for p in before} == before
    assert "libtpu" not in out.stderr.lower() and "E0000" not in out.stderr  # libtpu's start-up noise held back


def _config(inputs, workdir, **over) -> RunConfig:
    return RunConfig.from_flat(**{**inputs, **SEARCH, "workdir": str(workdir), "progress": False, **over})


def test_a_run_that_does_not_fit_names_the_executable_and_exits_1(header_only, tmp_path, monkeypatch, capsys):
    real = dry_run.topology_devices

    def tiny(topology):  # this machine's CPU, but with 1 KiB of memory
        devices, _, peak, bandwidth = real(topology)
        return devices, 1024.0, peak, bandwidth

    monkeypatch.setattr(dry_run, "topology_devices", tiny)
    status = dry_run.dry_run(_config(header_only, tmp_path / "wd"), "cpu")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert status == 1
    assert re.match(r"^dry run cpu: does not fit, peak \d+\.\d\d GiB per device of 0\.00 \((\S.*): \d+\.\d\d GiB over\)$",
                    last), last
    assert not (tmp_path / "wd").exists()


@pytest.mark.parametrize("granularity", ["adapter", "factors", "scale"])
def test_a_tuning_run_compiles_its_tuning_step(header_only, tmp_path, capsys, granularity):
    status = dry_run.dry_run(_config(header_only, tmp_path / "wd", tune_weights=True, tune_granularity=granularity),
                             "cpu")
    lines = capsys.readouterr().out.strip().splitlines()
    assert status == 0 and VERDICT.match(lines[-1]), lines[-1]
    rows = [line for line in lines if line.startswith(f"tune step k2 ({granularity})")]
    assert len(rows) == 1, lines
    cols = rows[0].split(")")[1].split()
    assert float(cols[-1]) > 0, lines  # compiled (seconds)
    # Its total bytes; the scale search's loss call is a forward pass of the tiny fixture (< 0.005 GiB).
    assert float(cols[3]) > 0 or granularity == "scale", lines
    # tuned weights (one per member, or one per cluster given to each member) reach merged/ through
    # the final merge; tuned factors are written as they are
    final = [line for line in lines if line.startswith("final merge")]
    assert [line.split()[:6] for line in final] == ([["final", "merge", "k2", "g5", "weighted", "2x5"]]
                                                    if granularity != "factors" else []), final
    assert not any("not compiled" in line for line in lines)
    assert not (tmp_path / "wd").exists()


def test_unknown_topology_and_missing_libtpu_are_one_line_errors(monkeypatch):
    with pytest.raises(UserError, match="unknown topology; use one of v4-8, v5e-1"):
        dry_run.topology_devices("v9-8")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    with pytest.raises(UserError, match=re.escape("pip install -e '.[tpu]'")):
        dry_run.topology_devices("v5e-8")


@pytest.mark.parametrize("method", ["ties", "ties_delta", "knots_ties"])
def test_prepared_shapes_are_what_prepare_merge_builds(header_only, method):
    """The dry run's shapes of a Prepared (merge.prepared_shapes, from the headers) are those
    prepare_merge gives the real adapters."""
    cfg = load_config(header_only["base_model"])
    names, modules, rank = dry_run.adapter_layout(header_only["adapters_dir"], cfg)
    rng = np.random.default_rng(0)
    dims = lora_lib.base_dims(cfg).shapes
    n, layers = len(names), cfg.num_layers
    adapters = lora_lib.AdapterSet(
        names=names, a={m: rng.normal(size=(n, layers, rank, dims[m][0])).astype(np.float32) for m in modules},
        b={m: rng.normal(size=(n, layers, dims[m][1], rank)).astype(np.float32) for m in modules},
        scaling=np.ones(n), ranks=np.full(n, rank), paths=("",) * n)
    want = jax.tree.map(lambda x: (np.shape(x), np.asarray(x).dtype), merge.prepare_merge(adapters, method, 0.5))
    got = jax.tree.map(lambda x: (x.shape, x.dtype),
                       dry_run.prepared_shapes(cfg, n, modules, rank, method, 0.5, 0, None))
    assert got == want


def test_an_absent_tpu_is_left_out_of_jax_platforms(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "libtpu" else real(name, *a))
    pci = tmp_path / "pci"
    (pci / "0000:00:01.0").mkdir(parents=True)
    (pci / "0000:00:01.0" / "vendor").write_text("0x8086\n")
    env: dict = {}
    cli.skip_absent_tpu(env, str(pci))
    assert env["JAX_PLATFORMS"] in ("cpu", "cuda,cpu")
    (pci / "0000:00:04.0").mkdir()
    (pci / "0000:00:04.0" / "vendor").write_text("0x1ae0\n")  # a Google device (a TPU chip)
    env = {}
    cli.skip_absent_tpu(env, str(pci))
    assert "JAX_PLATFORMS" not in env
    env = {"JAX_PLATFORMS": "tpu"}
    cli.skip_absent_tpu(env, str(tmp_path / "none"))
    assert env == {"JAX_PLATFORMS": "tpu"}


def test_model_flops_count_what_xla_counts_for_a_loop_free_packed_loss():
    """One layer (the last-layer path has no scan), no chunks (no lax.map): XLA's cost analysis
    then counts every dot once. It adds the elementwise work (norms, rotary, softmax, SiLU, the
    logsumexp over V), about 3 % of the dots at these dims (per token ~40 D + 5 F against
    2 (4 D^2 + 3 D F); per loss position ~4 V against 2 D V), hence the 5 % bound above."""
    from d2c_jax import loss, packing
    from d2c_jax.models.config import ModelConfig
    from d2c_jax.types import TokenBatch

    cfg = ModelConfig(arch="llama", vocab_size=4096, hidden_size=512, intermediate_size=1536, num_layers=1,
                      num_heads=8, num_kv_heads=2, head_dim=64, tie_embeddings=True)
    n, s, rank = 4, 48, 8
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, s, n)
    attn = (np.arange(s)[None] < lengths[:, None]).astype(np.int32)
    weights = (attn * (np.arange(s)[None] >= 12)).astype(np.float32)
    batch = TokenBatch(tokens=attn * 5, targets=attn * 7, weights=weights, attn=attn)
    pb = jax.tree.map(lambda x: x[0], packing.pack(jax.tree.map(lambda x: x[None], batch)))
    params = hf_io.param_shape_tree(cfg, np.float32)
    modules = ("q_proj", "v_proj")
    dims = lora_lib.base_dims(cfg).shapes
    lora = {m: {"a": jax.ShapeDtypeStruct((1, rank, dims[m][0]), np.float32),
                "b": jax.ShapeDtypeStruct((1, dims[m][1], rank), np.float32)} for m in modules}
    compiled = jax.jit(loss.packed_task_loss, static_argnums=1).lower(params, cfg, lora, pb).compile()
    xla = dry_run._xla_flops(compiled)
    p, q = pb.tokens.shape[0], pb.loss_at.shape[0]
    ours = dry_run.model_flops(cfg, modules, rank, tokens=p, loss_positions=q, examples=n, seq=s)
    assert ours <= xla <= 1.05 * ours, (ours, xla)


def test_auto_batch_size_never_picks_a_bucket_the_compiled_analysis_says_does_not_fit(header_only):
    """An abstract Scorer on 8 CPU devices ("cand" 4 x "model" 2) given just the memory its own
    estimate needs for 16 requests picks 16, and XLA's memory analysis of that call fits it."""
    from d2c_jax import data, scoring, sharding

    cfg = load_config(header_only["base_model"])
    names, modules, rank = dry_run.adapter_layout(header_only["adapters_dir"], cfg)
    td = data.load_task_data(header_only["data_dir"], names, hf_io.load_tokenizer(header_only["base_model"]),
                             examples_per_task=3, max_seq_len=64)
    prepared = dry_run.prepared_shapes(cfg, len(names), modules, rank, "ties", 0.5, 0, None)
    params = hf_io.param_shape_tree(cfg, "float32")
    mesh = sharding.make_mesh(num_candidate_shards=4, devices=jax.devices()[:8])
    probe = scoring.Scorer(params, cfg, prepared, td, batch_size=4, mesh=mesh, device_bytes=1 << 40)
    # What the Scorer holds: the examples and the prepared inputs padded to scoring.slots rows.
    held = [scoring.pad_axis0(x, scoring.slots(len(names))) for x in (td.batch, prepared)]
    resident = (scoring.tree_bytes(params) + sum(scoring.tree_bytes(x) for x in held)) // 2
    budget = resident + probe.call_bytes(16)
    scorer = scoring.Scorer(params, cfg, prepared, td, batch_size="auto", mesh=mesh, device_bytes=budget)
    assert scorer.batch_size == 16
    exes = scorer.executables(scorer.member_buckets(len(names)))
    for exe in exes:
        total = dry_run._memory(exe.jitted.lower(*exe.args, **exe.static).compile())[2]
        assert total <= budget, (exe.name, total, budget)


def test_auto_model_shards_takes_a_layout_whose_compiled_score_calls_fit(header_only, tmp_path):
    """8 CPU devices, each just too small (by the auto rule) to hold a whole replica of the tiny
    model: `--model_shards=auto` takes 2 devices per replica, and XLA's memory analysis of every
    score call on that mesh fits one device. A given count is kept, and refused if it does not
    divide the devices."""
    from d2c_jax import data, pipeline, scoring, sharding

    cfg = load_config(header_only["base_model"])
    names, modules, rank = dry_run.adapter_layout(header_only["adapters_dir"], cfg)
    params = hf_io.param_shape_tree(cfg, "float32")
    prepared = dry_run.prepared_shapes(cfg, len(names), modules, rank, "ties", 0.5, 0, None)
    need = scoring.tree_bytes(params) + sharding.PREPARED_COPIES * scoring.tree_bytes(prepared)
    device = 0.99 * need / sharding.REPLICA_SHARE
    run = _config(header_only, tmp_path / "wd", merge="ties", dtype="float32")
    assert run.model_shards == "auto"
    layout = (len(names), modules, rank)
    assert pipeline.model_shards(run, cfg, *layout, 8, device) == 2
    assert pipeline.model_shards(_config(header_only, tmp_path / "wd", model_shards="4"), cfg, *layout, 8, device) == 4
    with pytest.raises(UserError, match=r"--model_shards=3 must divide the 8 devices"):
        pipeline.model_shards(_config(header_only, tmp_path / "wd", model_shards="3"), cfg, *layout, 8, device)
    td = data.load_task_data(header_only["data_dir"], names, hf_io.load_tokenizer(header_only["base_model"]),
                             examples_per_task=3, max_seq_len=64)
    mesh = sharding.make_mesh(num_candidate_shards=4, devices=jax.devices()[:8])
    scorer = scoring.Scorer(params, cfg, prepared, td, batch_size="auto", mesh=mesh, device_bytes=int(device))
    for exe in scorer.executables(scorer.member_buckets(len(names))):
        total = dry_run._memory(exe.jitted.lower(*exe.args, **exe.static).compile())[2]
        assert total <= device, (exe.name, total, device)
