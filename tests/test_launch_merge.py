"""launch/merge.py end to end: the merged adapter it writes loads in PEFT with the delta of PEFT's
own add_weighted_adapter(ties, density 0.5); bad inputs give one `error:` line, exit 1, no
traceback and no output directory."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from fixtures_adapters import make_peft_adapters, peft_deltas  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402
from tolerances import MERGE_RTOL  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAMES = ["qa", "sum", "tone"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("launch_merge")
    base = make_tiny_model(root / "base", "llama", seed=0)
    dirs = make_peft_adapters(base, root / "adapters", NAMES, alphas=[16, 8, 32], seed=11)
    return {"root": root, "base": str(base), "dirs": dirs}


def _run(*args):
    return subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "merge.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )


def _load(base):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)


def test_merge_cli_matches_peft_ties(setup):
    from peft import PeftModel

    out = setup["root"] / "merged"
    res = _run(f"--adapters={','.join(setup['dirs'])}", "--method=ties", "--density=0.5", f"--output_dir={out}")
    assert res.returncode == 0, res.stderr
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == setup["base"]
    assert cfg["r"] == cfg["lora_alpha"] == 8

    pm = PeftModel.from_pretrained(_load(setup["base"]), setup["dirs"][0], adapter_name=NAMES[0])
    for name, d in zip(NAMES[1:], setup["dirs"][1:]):
        pm.load_adapter(d, adapter_name=name)
    pm.add_weighted_adapter(NAMES, [1.0] * 3, "ref", combination_type="ties", density=0.5)
    ref = peft_deltas(pm, "ref", 2)

    ours_pm = PeftModel.from_pretrained(_load(setup["base"]), str(out), adapter_name="ours")
    ours = peft_deltas(ours_pm, "ours", 2)
    assert set(ours) == set(ref)
    scale = max(np.abs(r).max() for r in ref.values())
    err = max(np.abs(ours[m] - ref[m]).max() for m in ref) / scale
    assert err <= MERGE_RTOL, err  # ours vs PEFT's float32 TIES merge (tolerances.py)


def _assert_clean_failure(res, out, words):
    assert res.returncode == 1, (res.stdout, res.stderr)
    assert "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and words in errors[0], res.stderr
    assert not os.path.exists(out)
    assert not [n for n in os.listdir(os.path.dirname(out)) if n.startswith(f".{os.path.basename(out)}")]


def test_missing_adapter_dir_is_one_error_line(setup):
    out = str(setup["root"] / "out_missing")
    res = _run(f"--adapters={setup['dirs'][0]},{setup['root']}/nope", f"--output_dir={out}")
    _assert_clean_failure(res, out, "nope: adapter directory does not exist")


def test_adapters_not_fitting_the_base_model_is_one_error_line(setup):
    other = make_tiny_model(setup["root"] / "other_base", "llama", seed=1, hidden_size=32)
    out = str(setup["root"] / "out_mismatch")
    res = _run(f"--adapters={','.join(setup['dirs'])}", f"--base_model={other}", f"--output_dir={out}")
    _assert_clean_failure(res, out, "adapter_model.safetensors: tensor base_model.model.model.layers.0")
