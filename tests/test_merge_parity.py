"""Our merges == PEFT's add_weighted_adapter, compared on the effective delta
(scaling * lora_B @ lora_A per layer and module) of real PEFT adapters on a tiny Llama."""


import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

from fixtures_adapters import make_peft_adapters, peft_deltas  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402
from tolerances import MERGE_RTOL, U  # noqa: E402

from d2c_jax import lora as lora_lib  # noqa: E402
from d2c_jax import merge  # noqa: E402
from d2c_jax.models.config import load_config  # noqa: E402

NAMES = ["t0", "t1", "t2", "t3"]
MASKS = [[1, 1, 1, 1], [1, 1, 0, 0], [0, 1, 1, 1], [1, 0, 0, 1], [0, 0, 1, 0]]
# Ours vs PEFT's float32 merge, of the largest |delta| (tolerances.py); ties_delta / ties_svd also
# pass a float32 SVD, whose error (SVD_RTOL's derivation) stays inside this bound while the merged
# delta's gap at rank r is >= sigma_1 / 2.
RTOL = MERGE_RTOL
pytestmark = pytest.mark.filterwarnings("ignore:The density 1.0 is greater:UserWarning")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("merge_parity")
    base = make_tiny_model(root / "base", "llama", seed=0)
    ads = root / "adapters"
    # Same rank (PEFT requires it for these methods), different alphas, one rslora adapter
    # with a different module set.
    dirs = make_peft_adapters(base, ads, NAMES[:3], alphas=[16, 8, 32], seed=1)
    dirs += make_peft_adapters(
        base, ads, NAMES[3:], alpha=12, use_rslora=True, seed=2,
        target_modules=("q_proj", "v_proj", "gate_proj", "down_proj"),
    )
    cfg = load_config(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    pm = PeftModel.from_pretrained(model, dirs[0], adapter_name=NAMES[0])
    for name, d in zip(NAMES[1:], dirs[1:]):
        pm.load_adapter(d, adapter_name=name)
    return {"cfg": cfg, "aset": lora_lib.load_adapter_set(ads, cfg), "peft": pm, "count": [0]}


def _rel_err(ours: dict, ref: dict) -> float:
    assert ref and set(ref) <= set(ours)
    scale = max(np.abs(r).max() for r in ref.values())
    assert scale > 0
    err = max(np.abs(ours[m] - ref.get(m, 0.0)).max() for m in ours)
    return float(err / scale)


def _peft_merge(setup, mask, weights, combination_type, density):
    pm = setup["peft"]
    setup["count"][0] += 1
    name = f"merged{setup['count'][0]}"
    sel = [i for i, keep in enumerate(mask) if keep]
    pm.add_weighted_adapter(
        [NAMES[i] for i in sel], [float(weights[i]) for i in sel], name,
        combination_type=combination_type, density=density,
    )
    return peft_deltas(pm, name, setup["cfg"].num_layers)


@pytest.mark.parametrize(
    "method,peft_type",
    [("ties", "ties"), ("linear", "linear"), ("magnitude_prune", "magnitude_prune"), ("ties_delta", "ties_svd")],
)
def test_merge_matches_peft_add_weighted_adapter(setup, method, peft_type):
    prepared = merge.prepare_merge(setup["aset"], method, 0.5)
    f = jax.jit(merge.merge_mask)
    for mask in MASKS:
        ours = lora_lib.lora_delta(f(prepared, np.array(mask, bool)))
        ref = _peft_merge(setup, mask, [1.0] * 4, peft_type, 0.5)
        err = _rel_err(ours, ref)
        assert err <= RTOL, f"{method} mask={mask}: relative error {err:.2e}"


def test_ties_with_signed_weights_matches_peft(setup):
    weights = [0.5, 1.5, -1.0, 2.0]
    prepared = merge.prepare_merge(setup["aset"], "ties", 0.3, weights=weights)
    for mask in MASKS[:4]:
        ours = lora_lib.lora_delta(merge.merge_mask(prepared, np.array(mask, bool)))
        ref = _peft_merge(setup, mask, weights, "ties", 0.3)
        assert _rel_err(ours, ref) <= RTOL


def test_dare_ties_without_dropping_matches_peft(setup):
    """density 1 keeps everything (PEFT skips pruning), leaving DARE's sign election + disjoint mean."""
    prepared = merge.prepare_merge(setup["aset"], "dare_ties", 1.0, seed=0)
    ours = lora_lib.lora_delta(merge.merge_mask(prepared, np.ones(4, bool)))
    ref = _peft_merge(setup, [1, 1, 1, 1], [1.0] * 4, "dare_ties", 1.0)
    assert _rel_err(ours, ref) <= RTOL


def test_ties_with_different_ranks_matches_peft_primitives(tmp_path):
    """PEFT's add_weighted_adapter refuses different ranks; the reference is PEFT's own per-tensor
    primitives: prune each adapter's true-rank matrix, zero-pad, elect signs, disjoint mean."""
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune

    base = make_tiny_model(tmp_path / "base", "llama", seed=0, hidden_size=32, intermediate_size=48)
    ads = tmp_path / "ads"
    make_peft_adapters(base, ads, ["a", "b", "c"], ranks=[4, 8, 6], alphas=[8, 4, 12], seed=5,
                       target_modules=("q_proj", "down_proj"))
    aset = lora_lib.load_adapter_set(ads, load_config(base))
    ours = merge.merge_mask(merge.prepare_merge(aset, "ties", 0.5), np.ones(3, bool))
    R = aset.rank
    for m in ("q_proj", "down_proj"):
        for layer in range(aset.num_layers):
            fac = {"a": [], "b": []}
            w = {"a": [], "b": []}
            for i, r in enumerate(aset.ranks):
                s = float(aset.scaling[i])
                a = torch.from_numpy(aset.a[m][i, layer, :r].copy())
                b = torch.from_numpy(aset.b[m][i, layer, :, :r].copy())
                fac["a"].append(torch.nn.functional.pad(prune(a, 0.5, "magnitude"), (0, 0, 0, R - r)))
                fac["b"].append(torch.nn.functional.pad(prune(b, 0.5, "magnitude"), (0, R - r)))
                w["a"].append(np.sqrt(s))
                w["b"].append(np.sqrt(s))
            ref = {}
            for k in "ab":
                t = torch.stack(fac[k])
                sign_mask = calculate_majority_sign_mask(t)
                wt = torch.tensor(w[k]).view(-1, 1, 1)
                ref[k] = disjoint_merge(t * wt, sign_mask).numpy()
            want = ref["b"].astype(np.float64) @ ref["a"].astype(np.float64)
            got = np.asarray(ours[m]["b"][layer], np.float64) @ np.asarray(ours[m]["a"][layer], np.float64)
            assert np.abs(got - want).max() <= RTOL * np.abs(want).max()


@pytest.mark.parametrize(
    "method,peft_type", [("ties", "ties"), ("magnitude_prune", "magnitude_prune"), ("ties_delta", "ties_svd")])
def test_trimming_methods_match_peft_at_density_0_3(setup, method, peft_type):
    """At density 0.3 seven in ten entries of every factor (or delta) are trimmed."""
    prepared = merge.prepare_merge(setup["aset"], method, 0.3)
    f = jax.jit(merge.merge_mask)
    for mask in MASKS[:3]:
        ours = lora_lib.lora_delta(f(prepared, np.array(mask, bool)))
        ref = _peft_merge(setup, mask, [1.0] * 4, peft_type, 0.3)
        err = _rel_err(ours, ref)
        assert err <= RTOL, f"{method} mask={mask}: relative error {err:.2e}"
    trimmed = lora_lib.lora_delta(f(merge.prepare_merge(setup["aset"], method, 0.5), np.ones(4, bool)))
    assert _rel_err(trimmed, ref) > 100 * RTOL  # density matters: 0.5 is visibly another merge


def test_dare_keeps_each_entry_with_probability_density_and_rescales(setup):
    """DARE (Yu et al., 2024; PEFT random_pruning(rescale=True)): each entry is kept independently
    with probability `density` and divided by `density`. Checked on ~20k entries: the kept fraction
    is within 5 binomial standard deviations of density (density**2 would be 30 sigmas off) and
    every kept entry is exactly the original / density."""
    aset = setup["aset"]
    for density in (0.3, 0.7):
        prepared = merge.prepare_merge(aset, "dare_ties", density, seed=3)
        kept, total = 0, 0
        for m in aset.a:
            for key, orig in (("a", aset.a[m]), ("b", aset.b[m])):
                got = np.asarray(prepared.task[m][key])
                real = orig != 0  # true-rank entries of adapted layers
                keep = (got != 0) & real
                assert not (got != 0)[~real].any()
                # one correctly rounded float32 division, by us and here: bit for bit
                np.testing.assert_array_equal(got[keep], orig[keep] / np.float32(density))
                kept, total = kept + int(keep.sum()), total + int(real.sum())
        sigma = np.sqrt(density * (1 - density) / total)
        assert total > 10_000 and abs(kept / total - density) < 5 * sigma, (density, kept / total, sigma)
        assert abs(kept / total - density ** 2) > 30 * sigma
        other = merge.prepare_merge(aset, "dare_ties", density, seed=4)
        assert any(not np.array_equal(np.asarray(prepared.task[m]["a"]), np.asarray(other.task[m]["a"]))
                   for m in aset.a)  # the seed draws the drop mask


def test_dare_ties_after_the_drop_is_peft_sign_election_and_disjoint_mean(setup):
    """Given our drop (random, so it cannot be PEFT's draw), the rest of dare_ties at density 0.3 is
    PEFT's: weighted by sqrt(scaling), majority sign of the dropped tensors, disjoint mean."""
    from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge

    aset = setup["aset"]
    prepared = merge.prepare_merge(aset, "dare_ties", 0.3, seed=0)
    ours = merge.merge_mask(prepared, np.ones(4, bool))
    w = np.sqrt(np.abs(aset.scaling))
    for m in aset.a:
        for key in ("a", "b"):
            t = torch.from_numpy(np.asarray(prepared.task[m][key]).copy())  # [N, L, ...]
            for layer in range(aset.num_layers):
                tl = t[:, layer]
                sign = calculate_majority_sign_mask(tl)
                want = disjoint_merge(tl * torch.from_numpy(w.astype(np.float32)).view(-1, 1, 1), sign).numpy()
                # the same float32 products x_i w_i; a sum of <= 4 agreeing (same-sign, so no
                # cancellation) ones in another order and one division: <= 4 U + O(U^2) per side
                np.testing.assert_allclose(np.asarray(ours[m][key][layer]), want, rtol=9 * U, atol=0)


@pytest.mark.parametrize("method,peft_type", [("ties", "ties"), ("linear", "linear"), ("ties_delta", "ties_svd")])
def test_tuning_weights_on_a_unit_merge_matches_peft_weighted_merge(setup, method, peft_type):
    """tune.with_weights (how tuned weights enter a merge): the unit-weight Prepared with
    non-unit weights multiplied in == PEFT's add_weighted_adapter with those weights; w = 1
    gives the unit merge exactly."""
    from d2c_jax import tune

    weights = np.array([0.5, 1.5, -0.8, 2.0])
    unit = merge.prepare_merge(setup["aset"], method, 0.5)
    f = jax.jit(lambda p, w, m: merge.merge_mask(tune.with_weights(p, w), m))
    for mask in MASKS[:4]:
        ours = lora_lib.lora_delta(f(unit, weights, np.array(mask, bool)))
        ref = _peft_merge(setup, mask, weights, peft_type, 0.5)
        assert _rel_err(ours, ref) <= RTOL, f"{method} mask={mask}"
        same = f(unit, np.ones(4), np.array(mask, bool))
        plain = merge.merge_mask(unit, np.array(mask, bool))
        for x, y in zip(jax.tree.leaves(same), jax.tree.leaves(plain)):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_per_layer_weights_merge_each_layer_with_its_own_weights(setup):
    """Weights [N, L]: layer l of the merge == the merge with the per-adapter weights w[:, l]."""
    from d2c_jax import tune

    aset = setup["aset"]
    num_layers = aset.num_layers
    w_nl = np.linspace(0.3, 2.0, 4 * num_layers).reshape(4, num_layers)
    unit = merge.prepare_merge(aset, "ties", 0.5)
    got = merge.merge_mask(tune.with_weights(unit, w_nl), np.ones(4, bool))
    for layer in range(num_layers):
        ref = merge.merge_mask(merge.prepare_merge(aset, "ties", 0.5, weights=w_nl[:, layer]), np.ones(4, bool))
        for m in ref:
            for f in "ab":
                # weights w sqrt(s) rounded to float32 once per path (2 U), the disjoint mean of
                # <= 4 agreeing terms (4 U): 1e-6 ~ 17 U; atol for entries where nothing agrees (0)
                np.testing.assert_allclose(np.asarray(got[m][f][layer]), np.asarray(ref[m][f][layer]),
                                           rtol=1e-6, atol=1e-7)
