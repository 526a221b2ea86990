"""launch/evaluate.py + d2c_jax/evaluation.py: single / partition / zero-shot evaluation, batched
generation, output file, error contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

import jax  # noqa: E402

from d2c_jax import data, evaluation, generate, loss, lora as lora_lib, merge  # noqa: E402
from d2c_jax.errors import UserError  # noqa: E402
from test_scoring import build_setup  # noqa: E402
from tolerances import LOSS_RTOL  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, "launch", "evaluate.py")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    s = build_setup(str(tmp_path_factory.mktemp("evaluate")))
    with open(os.path.join(s["data_dir"], "t1.eval.jsonl"), "w") as f:
        f.write(json.dumps({"prompt": "count the vowels", "response": "one two"}) + "\n")
    s["adapters_dir"] = os.path.dirname(s["adapters"].paths[0])
    s["expected"] = _expected_losses(s)
    return s


def _expected_losses(s):
    """{mode: [T] losses} on the eval split, computed with loss.task_loss in one compiled call:
    each task with its own adapter, with the merge of clusters {t0, t2, t3} {t1}, and with a
    zero adapter (= the base model)."""
    td = data.load_task_data(s["data_dir"], s["adapters"].names, s["tok"], split="eval",
                             max_seq_len=64)
    single = [lora_lib.effective_lora(s["adapters"], i) for i in range(4)]
    masks = np.array(PARTITION_MASKS, bool)
    merged_c = jax.tree.map(np.asarray, jax.jit(merge.merge_masks)(s["prepared"], masks))
    zero = [jax.tree.map(np.zeros_like, single[0])] * 4
    lora_c = jax.tree.map(lambda *x: np.concatenate([np.stack(x[:4]), x[4], np.stack(x[5:])]),
                          *single, merged_c, *zero)
    batch = jax.tree.map(lambda x: np.concatenate([x] * 3), td.batch)
    fn = jax.jit(loss.candidate_losses, static_argnums=1)
    out = np.asarray(fn(s["params"], s["cfg"], lora_c, batch))
    return {"single": out[:4], "partition": out[4:8], "zero_shot": out[8:]}


PARTITION_MASKS = [[1, 0, 1, 1], [0, 1, 0, 0], [1, 0, 1, 1], [1, 0, 1, 1]]


@pytest.fixture(scope="module")
def script():
    return evaluation


def _run(*args):
    return subprocess.run([sys.executable, SCRIPT, *args], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def _common(s, out):
    return [f"--base_model={s['model_dir']}", f"--adapters_dir={s['adapters_dir']}",
            f"--data_dir={s['data_dir']}", f"--output={out}", "--dtype=float32", "--max_seq_len=64"]


def test_single_adapters_end_to_end(setup, tmp_path):
    out = tmp_path / "sub" / "eval.json"
    proc = _run(*_common(setup, out), "--batch_size=3")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    names = setup["adapters"].names
    assert sorted(result["tasks"]) == sorted(names) and result["summary"]["mode"] == "single"
    want = setup["expected"]["single"]
    got = [result["tasks"][n]["loss"] for n in names]
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)  # packed per task vs one vmapped padded program
    assert result["summary"]["mean_loss"] == pytest.approx(np.mean(want), rel=LOSS_RTOL)  # a mean keeps it
    assert result["tasks"]["t1"]["data_file"] == "t1.eval.jsonl"  # held-out split preferred
    assert result["tasks"]["t0"]["data_file"] == "t0.jsonl"  # ... else the search examples
    assert [p for p in os.listdir(out.parent) if p != "eval.json"] == []  # no temp files left


def test_partition_uses_each_clusters_merge(setup, script, tmp_path):
    part = tmp_path / "partition.json"
    part.write_text(json.dumps({"clusters": [["t0", "t2", "t3"], ["t1"]], "merge": "ties",
                                "density": 0.5}))
    cfg = script.EvalConfig(base_model=setup["model_dir"], adapters_dir=setup["adapters_dir"],
                            data_dir=setup["data_dir"], output=str(tmp_path / "o.json"),
                            partition=str(part), dtype="float32", max_seq_len=64)
    result = script.evaluate(cfg)
    want = setup["expected"]["partition"]
    got = [result["tasks"][n]["loss"] for n in setup["adapters"].names]
    np.testing.assert_allclose(got, want, rtol=LOSS_RTOL)  # tolerances.py
    assert [result["tasks"][n]["cluster"] for n in setup["adapters"].names] == [0, 1, 0, 0]
    assert result["summary"]["mode"] == "partition" and result["summary"]["num_clusters"] == 2

    part.write_text(json.dumps({"clusters": [["t0", "t2"], ["t1", "t9"]]}))
    with pytest.raises(UserError, match=r"partition.json: task\(s\) with no adapter: t9"):
        script.evaluate(cfg)
    part.write_text(json.dumps({"clusters": [["t0", "t2"], ["t1"]]}))
    with pytest.raises(UserError, match=r"in no cluster: t3"):
        script.evaluate(cfg)


def test_zero_shot_and_generation_metrics(setup, script, tmp_path):
    with open(os.path.join(setup["data_dir"], "tasks.json"), "w") as f:
        json.dump({"t0": {"metric": "exact_match"}}, f)
    try:
        cfg = script.EvalConfig(base_model=setup["model_dir"], adapters_dir=None,
                                data_dir=setup["data_dir"], output=str(tmp_path / "o.json"),
                                zero_shot=True, metrics=("loss", "generation"), dtype="float32",
                                max_seq_len=64, max_new_tokens=3)
        result = script.evaluate(cfg)
    finally:
        os.remove(os.path.join(setup["data_dir"], "tasks.json"))
    got = [result["tasks"][n]["loss"] for n in setup["adapters"].names]
    np.testing.assert_allclose(got, setup["expected"]["zero_shot"], rtol=LOSS_RTOL)  # tolerances.py
    assert "exact_match" in result["tasks"]["t0"] and "rouge_l" in result["tasks"]["t1"]
    assert result["summary"]["mode"] == "zero_shot" and "mean_score" in result["summary"]


def test_bad_input_is_one_error_line_and_no_output(setup, tmp_path):
    bad_data = tmp_path / "data"
    bad_data.mkdir()
    for name in ("t0", "t1", "t2"):  # t3 has an adapter but no examples
        (bad_data / f"{name}.jsonl").write_text('{"prompt": "a", "response": "b"}\n')
    out = tmp_path / "eval.json"
    args = _common(setup, out)
    args[2] = f"--data_dir={bad_data}"
    proc = _run(*args)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "t3" in errors[0] and str(bad_data) in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and os.listdir(tmp_path) == ["data"]


def test_batched_generation_equals_one_adapter_at_a_time(setup):
    """Rows of all tasks decoded together, each with its cluster's merge, give the same text as
    generate_texts run task by task with that one adapter."""
    s = setup
    td = data.load_task_data(s["data_dir"], s["adapters"].names, s["tok"], split="eval",
                             max_seq_len=64)
    ev = evaluation.Evaluator(s["params"], s["cfg"], s["tok"], td, ["exact_match"] * 4,
                              prepared=s["prepared"], max_new_tokens=4, generation_batch_size=4)
    partition_n = np.array([0, 1, 0, 0], np.int32)
    got = ev.partition(partition_n, 2)
    merged = [jax.tree.map(np.asarray, merge.merge_mask(s["prepared"], partition_n == k))
              for k in range(2)]
    for t in range(4):
        want = generate.generate_texts(s["params"], s["cfg"], s["tok"], merged[partition_n[t]],
                                       [list(p) for p in td.prompt_ids[t]], max_new_tokens=4)
        assert list(got.predictions[t]) == want
    single = ev.single()
    for t in range(4):
        want = generate.generate_texts(s["params"], s["cfg"], s["tok"],
                                       lora_lib.effective_lora(s["adapters"], t),
                                       [list(p) for p in td.prompt_ids[t]], max_new_tokens=4)
        assert list(single.predictions[t]) == want
    np.testing.assert_allclose(single.losses_t, s["expected"]["single"], rtol=LOSS_RTOL)  # tolerances.py
