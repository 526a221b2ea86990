"""The budget mode's byte accounting against the files themselves: the bytes it counts for the N
input adapters are their safetensors' tensor bytes, and the bytes it counts for K merged adapters
at rank r are the tensor bytes of the K adapters `pipeline.write_merged` writes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import budget, lora, merge, pipeline  # noqa: E402
from d2c_jax.models.config import load_config  # noqa: E402
from fixtures_adapters import make_peft_adapters  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402


def tensor_bytes(path: str) -> int:
    """Bytes of a safetensors file's tensors (file size less the 8-byte length and the header),
    checked against the header's offsets; every tensor float32."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    assert {t["dtype"] for t in header.values()} == {"F32"}
    payload = sum(t["data_offsets"][1] - t["data_offsets"][0] for t in header.values())
    assert payload == os.path.getsize(path) - 8 - n
    return payload


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Four adapters of mixed ranks, modules (k_proj / v_proj: d_out != d_in) and layers."""
    root = tmp_path_factory.mktemp("budget")
    base = make_tiny_model(root / "base", "llama", num_hidden_layers=3)
    ads = root / "adapters"
    make_peft_adapters(base, ads, ["a"], r=4, alpha=8, target_modules=("q_proj", "k_proj"), seed=1)
    make_peft_adapters(base, ads, ["b"], r=2, alpha=4, target_modules=("q_proj", "gate_proj"), seed=2,
                       layers_to_transform=[1])
    make_peft_adapters(base, ads, ["c"], r=4, alpha=4, target_modules=("v_proj",), seed=3, layers_to_transform=[0, 2])
    make_peft_adapters(base, ads, ["d"], r=3, alpha=3, target_modules=("q_proj", "k_proj", "down_proj"), seed=4)
    aset = lora.load_adapter_set(str(ads), load_config(base))
    return dict(base=str(base), ads=str(ads), aset=aset)


def test_the_adapters_bytes_are_their_files_tensor_bytes(inputs):
    files = sum(tensor_bytes(os.path.join(inputs["ads"], n, lora.WEIGHTS_NAME)) for n in "abcd")
    assert budget.adapters_bytes(inputs["aset"]) == files
    assert budget.budget_bytes(inputs["aset"], 100.0, None) == files
    assert budget.budget_bytes(inputs["aset"], 30.0, None) == int(files * 0.3)


def test_the_merged_adapters_written_hold_the_bytes_the_budget_counts(inputs, tmp_path):
    aset = inputs["aset"]
    limit = budget.budget_bytes(aset, 100.0, None)
    ways = budget.candidates(aset, limit, (1, 2, 4))
    assert len(ways) >= 2
    for k, r in ways:
        prepared = merge.prepare_merge(aset, "ties", 0.5, rank=r)
        out = str(tmp_path / f"k{k}_r{r}")
        pipeline.write_merged(out, np.arange(aset.num_adapters) % k, k, prepared, inputs["base"])
        written = sum(tensor_bytes(os.path.join(out, f"cluster_{c}", lora.WEIGHTS_NAME)) for c in range(k))
        assert written == budget.storage_bytes(aset, k, r) <= limit, (k, r)
        # the largest K that fits at this rank: one more cluster would not
        assert k == aset.num_adapters - 1 or budget.storage_bytes(aset, k + 1, r) > limit
