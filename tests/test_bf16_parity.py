"""bfloat16 end to end: our decoder, LoRA and task loss with bfloat16 weights equal transformers +
PEFT loaded in bfloat16 (the same dtype on both sides), within a tolerance derived from bf16's
precision; the norms equal HF's own modules bit for bit; a --dtype=bfloat16 search and evaluate
report the losses transformers + PEFT compute in bfloat16.

The tolerance. bfloat16 keeps 8 significant bits: unit roundoff U = 2**-8 (a rounding moves a
value by at most U/2 relative, by about U/4 on average). Both sides follow the same recipe (norm
statistics, softmax and rotary tables in float32, each linear accumulated in float32 and rounded
once, the LoRA path in float32 as PEFT keeps adapter weights in float32), but they round at
different points: HF rounds the attention scores and the logits themselves to bf16 and runs
sdpa, we keep scores and logits in float32. So every activation of one side differs from the other
by a few roundings, i.e. a few U relative, and that difference travels through the model. For a
logit z of a model whose largest |logit| is `scale`, we therefore allow
    mean |z_ours - z_hf| <= 2 U scale    (measured 0.5-0.7 U scale on these models)
    max  |z_ours - z_hf| <= 32 U scale   (one bad position, e.g. a wrong mask, is far larger)
and for the mean cross-entropy over response tokens, whose first-order change per token is
sum_v p_v dz_v - dz_target (a softmax-weighted mean of the logit errors minus one of them, so about
sqrt(2) rms(dz) ~ 1.8 mean|dz| ~ 1.1 U scale for the measured errors), averaged over the tokens:
    |loss_ours - loss_hf| <= 2 U scale    (measured 0.1-0.3 U scale).
The guards below show these are tight enough to matter: dropping the LoRA delta for bf16
activations, or computing the norm statistics in bf16, fails them. The norms themselves are
compared with HF's modules exactly: both compute in float32 and round once, so the outputs agree
bit for bit except where float32 summation order flips a rounding tie (probability ~1e-4 per
element); without the upcast a quarter to half of all elements differ.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
peft = pytest.importorskip("peft")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from d2c_jax import data, hf_io, loss, lora as lora_lib  # noqa: E402
from d2c_jax.models import decoder  # noqa: E402
from d2c_jax.models.config import LORA_MODULES  # noqa: E402
from fixtures_adapters import make_peft_adapters, peft_lora_tree  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402
from fixtures_search_inputs import NAMES, child_env, make_search_inputs, read_partition, search_argv  # noqa: E402

U = 2.0 ** -8  # bfloat16 unit roundoff
MEAN_TOL, MAX_TOL, LOSS_TOL = 2 * U, 32 * U, 2 * U  # times the largest |logit|, see the docstring
LENGTHS = (12, 7, 4)
ARCHS = ("llama", "qwen2", "stablelm")
EXAMPLES = [
    {"prompt": "translate the sentence into french", "response": "the quick brown fox"},
    {"prompt": "one two", "response": "three four five six seven eight nine ten"},
    {"prompt": "question: who wrote the book? answer in one short sentence", "response": "the author"},
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
_forward = jax.jit(decoder.forward, static_argnums=1)


def _batch(vocab: int):
    rng = np.random.default_rng(0)
    s = max(LENGTHS)
    mask_bs = (np.arange(s)[None] < np.array(LENGTHS)[:, None]).astype(np.int64)
    return np.where(mask_bs == 1, rng.integers(3, vocab, size=(len(LENGTHS), s)), 0), mask_bs


def _real(x_bsv: np.ndarray) -> np.ndarray:
    return np.concatenate([x_bsv[b, :n].ravel() for b, n in enumerate(LENGTHS)])


def _errors(ours_bsv, ref_bsv) -> tuple[float, float, float]:
    """(mean |diff|, max |diff|) over the real positions, in units of U * max|ref logit|; scale."""
    d = np.abs(_real(ours_bsv) - _real(ref_bsv))
    scale = float(np.abs(_real(ref_bsv)).max())
    return float(d.mean()) / (U * scale), float(d.max()) / (U * scale), scale


def _within(errs) -> bool:
    mean_u, max_u, _ = errs
    return mean_u <= MEAN_TOL / U and max_u <= MAX_TOL / U


def _hf_logits(model, tokens_bs, mask_bs) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.tensor(tokens_bs), attention_mask=torch.tensor(mask_bs)).logits
    return out.float().numpy()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """Per architecture, once: the tiny model, HF in bf16 with a random PEFT LoRA on every module,
    our bf16 params and the same LoRA as our pytree."""
    cache = {}

    def get(arch):
        if arch not in cache:
            d = make_tiny_model(tmp_path_factory.mktemp(f"bf16_{arch}"), arch, seed=1)
            base = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
            config = peft.LoraConfig(r=4, lora_alpha=12, lora_dropout=0.0, target_modules=list(LORA_MODULES))
            model = peft.get_peft_model(base, config).eval()
            gen = torch.Generator().manual_seed(7)
            with torch.no_grad():
                for name, p in model.named_parameters():
                    if "lora_A" in name or "lora_B" in name:
                        p.copy_(0.2 * torch.randn(p.shape, generator=gen))
            assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if "lora_" in n)
            cfg, params = hf_io.load_model(d, "bfloat16")
            assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(params))
            cache[arch] = dict(dir=d, model=model, cfg=cfg, params=params,
                               lora=peft_lora_tree(model, cfg, 12 / 4))
        return cache[arch]

    return get


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_logits_match_transformers_bf16(built, arch):
    b = built(arch)
    tokens_bs, mask_bs = _batch(b["cfg"].vocab_size)
    with b["model"].disable_adapter():
        ref = _hf_logits(b["model"], tokens_bs, mask_bs)
    ours = np.asarray(_forward(b["params"], b["cfg"], jnp.asarray(tokens_bs), jnp.asarray(mask_bs)))
    assert ours.dtype == np.float32
    errs = _errors(ours, ref)
    print(f"[bf16] {arch} base: mean {errs[0]:.2f} U*scale, max {errs[1]:.2f} U*scale, scale {errs[2]:.2f}")
    assert _within(errs), errs


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_lora_logits_match_peft_bf16_and_dropping_the_lora_fails(built, arch):
    b = built(arch)
    tokens_bs, mask_bs = _batch(b["cfg"].vocab_size)
    ref = _hf_logits(b["model"], tokens_bs, mask_bs)
    args = (b["params"], b["cfg"], jnp.asarray(tokens_bs), jnp.asarray(mask_bs))
    errs = _errors(np.asarray(_forward(*args, b["lora"])), ref)
    print(f"[bf16] {arch} LoRA: mean {errs[0]:.2f} U*scale, max {errs[1]:.2f} U*scale, scale {errs[2]:.2f}")
    assert _within(errs), errs
    # Guard: the LoRA delta silently dropped for bf16 activations = the base model's logits.
    dropped = _errors(np.asarray(_forward(*args)), ref)
    assert dropped[0] > 10 * MEAN_TOL / U, dropped


@pytest.mark.parametrize("arch", ARCHS)
def test_bf16_task_loss_matches_peft_bf16(built, arch, tmp_path):
    """The data pipeline + task_loss with bf16 weights vs PeftModel (bf16 base, adapter loaded from
    a PEFT directory) on one padded batch with prompt labels -100."""
    from peft import PeftModel

    b = built(arch)
    ad_dir = make_peft_adapters(b["dir"], tmp_path / "ads", ["t"], r=4, alpha=8, scale=0.5,
                                target_modules=LORA_MODULES, seed=3)[0]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "t.jsonl").write_text("".join(json.dumps(e) + "\n" for e in EXAMPLES))
    tok = hf_io.load_tokenizer(b["dir"])
    td = data.load_task_data(tmp_path / "data", ["t"], tok, max_seq_len=64)
    aset = lora_lib.load_adapter_set(tmp_path / "ads", b["cfg"])
    fn = jax.jit(loss.task_loss, static_argnums=1)
    first_task = jax.tree.map(lambda x: x[0], td.batch)
    ours = float(fn(b["params"], b["cfg"], lora_lib.effective_lora(aset, 0), first_task))
    base_loss = float(fn(b["params"], b["cfg"], None, first_task))

    base = AutoModelForCausalLM.from_pretrained(b["dir"], dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(base, ad_dir).eval()
    real = td.attn_tns[0].astype(bool)
    ids = torch.tensor(np.where(real, td.tokens_tns[0], tok.pad_token_id), dtype=torch.long)
    labels = torch.tensor(np.where(td.weights_tns[0] > 0, td.targets_tns[0], -100), dtype=torch.long)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=torch.tensor(td.attn_tns[0], dtype=torch.long)).logits
        # labels are already shifted (targets = next tokens): HF's loss_function is CE over them.
        ref = float(torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(),
                                                      ignore_index=-100))
    scale = float(logits.float().abs().max())
    print(f"[bf16] {arch} loss: ours {ours:.5f} peft {ref:.5f} |diff| {abs(ours - ref) / (U * scale):.2f} U*scale; "
          f"without LoRA {base_loss:.5f}")
    assert abs(ours - ref) <= LOSS_TOL * scale
    assert abs(base_loss - ref) > 2 * LOSS_TOL * scale  # guard: dropping the LoRA fails


# ---------------------------------------------------------------------------------------------
# Norms: bit-level agreement with HF's own modules in bf16, and the guard without the upcast.


def _rms_no_upcast(x, scale, eps):
    return scale * (x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def _layer_norm_no_upcast(x, scale, bias, eps):
    mu = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mu), axis=-1, keepdims=True)
    return (x - mu) * jax.lax.rsqrt(var + eps) * scale + bias


def _norm_inputs(d: int) -> np.ndarray:
    """Residual-stream-like bf16 values: per-channel scales and offsets (bf16-exact in float32)."""
    rng = np.random.default_rng(0)
    x = rng.normal(0, 1, (8, 32, d)) * rng.uniform(0.2, 4, d) + rng.normal(0, 2, d)
    return torch.tensor(x, dtype=torch.float32).bfloat16().float().numpy()


def _mismatch(ours, ref) -> tuple[float, float]:
    """(fraction of elements that differ, largest difference in bf16 ulps of the reference)."""
    ours, ref = np.asarray(ours, np.float32), np.asarray(ref, np.float32)
    ulp = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(ref), 1e-30))) - 7)
    return float(np.mean(ours != ref)), float((np.abs(ours - ref) / ulp).max())


@pytest.mark.parametrize("arch", ARCHS)
def test_norms_equal_hf_modules_in_bf16_and_not_without_the_upcast(built, arch):
    b = built(arch)
    layer = b["model"].base_model.model.model.layers[0]
    cfg = b["cfg"]
    x = _norm_inputs(cfg.hidden_size)
    with torch.no_grad():
        ref = layer.input_layernorm(torch.tensor(x).bfloat16()).float().numpy()
    lp = jax.tree.map(lambda a: a[0], b["params"]["layers"]["input_norm"])
    x16 = jnp.asarray(x, jnp.bfloat16)
    ours = decoder.norm(lp, cfg, x16)
    assert ours.dtype == jnp.bfloat16
    frac, ulps = _mismatch(ours.astype(jnp.float32), ref)
    print(f"[bf16] {arch} {cfg.norm} norm: {frac:.2e} of elements differ from HF, max {ulps} ulp")
    assert frac <= 1e-3 and ulps <= 1
    if cfg.norm == "rms":
        plain = _rms_no_upcast(x16, lp["scale"], cfg.norm_eps)
    else:
        plain = _layer_norm_no_upcast(x16, lp["scale"], lp["bias"], cfg.norm_eps)
    frac, ulps = _mismatch(plain.astype(jnp.float32), ref)
    assert frac > 0.1 and ulps >= 2, (frac, ulps)  # guard: statistics in bf16 are visibly different


# ---------------------------------------------------------------------------------------------
# --dtype=bfloat16 through launch/search.py and launch/evaluate.py.


def _hf_bf16_losses(base_model: str, adapter_of: dict, data_dir: str) -> dict:
    """transformers + PEFT in bf16, one example at a time: {task: (CE over response tokens (+EOS)
    summed over the task's examples / their count, max |logit|)} with task's adapter
    `adapter_of[task]` (None: the base model); logits upcast to float32 as HF's loss does."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_model)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.bfloat16).eval()
    dirs = sorted({d for d in adapter_of.values() if d is not None})
    if dirs:
        model = PeftModel.from_pretrained(model, dirs[0], adapter_name="a0").eval()
        for i, d in enumerate(dirs[1:], start=1):
            model.load_adapter(d, adapter_name=f"a{i}")
    out = {}
    for task, adapter_dir in adapter_of.items():
        total, count, scale = 0.0, 0, 0.0
        with open(os.path.join(data_dir, f"{task}.jsonl")) as f:
            examples = [json.loads(line) for line in f]
        for ex in examples:
            p = tok(ex["prompt"])["input_ids"]
            r = tok(ex["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            with torch.no_grad():
                if adapter_dir is None:
                    ctx = model.disable_adapter() if dirs else torch.no_grad()
                else:
                    model.set_adapter(f"a{dirs.index(adapter_dir)}")
                    ctx = torch.no_grad()
                with ctx:
                    logits = model(input_ids=torch.tensor([p + r])).logits[0, :-1].float()
            labels = torch.tensor([-100] * (len(p) - 1) + r)
            total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100,
                                                       reduction="sum").item()
            count += len(r)
            scale = max(scale, float(logits.abs().max()))
        out[task] = (total / count, scale)
    return out


@pytest.fixture(scope="module")
def search_inputs(tmp_path_factory):
    return make_search_inputs(tmp_path_factory.mktemp("bf16_inputs"))


def test_bf16_search_reports_the_losses_peft_computes_in_bf16(search_inputs, tmp_path):
    wd = tmp_path / "wd"
    args = search_argv(search_inputs, wd, dtype="bfloat16", iterations=3)
    proc = subprocess.run([sys.executable, os.path.join(REPO, "launch", "search.py"), *args, "--noprogress"],
                          capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = read_partition(wd)
    assert json.loads((wd / "config.json").read_text())["dtype"] == "bfloat16"
    assert sorted(t for c in doc["clusters"] for t in c) == sorted(NAMES)
    merged_of = {t: str(wd / "merged" / f"cluster_{k}") for k, c in enumerate(doc["clusters"]) for t in c}
    ref = _hf_bf16_losses(search_inputs["base_model"], merged_of, search_inputs["data_dir"])
    for task, (want, scale) in ref.items():
        got = doc["task_losses"][task]
        print(f"[bf16 search] {task}: ours {got:.5f} peft {want:.5f}")
        assert abs(got - want) <= LOSS_TOL * scale, (task, got, want)


def test_bf16_evaluate_reports_the_losses_peft_computes_in_bf16(search_inputs, tmp_path):
    out = tmp_path / "eval.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "evaluate.py"), f"--base_model={search_inputs['base_model']}",
         f"--adapters_dir={search_inputs['adapters_dir']}", f"--data_dir={search_inputs['data_dir']}",
         f"--output={out}", "--dtype=bfloat16", "--max_seq_len=64"],
        capture_output=True, text=True, env=child_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    assert doc["summary"]["dtype"] == "bfloat16"
    inputs = search_inputs
    own = _hf_bf16_losses(inputs["base_model"], {t: os.path.join(inputs["adapters_dir"], t) for t in NAMES},
                          inputs["data_dir"])
    base = _hf_bf16_losses(inputs["base_model"], {t: None for t in NAMES}, inputs["data_dir"])
    for task, (want, scale) in own.items():
        got = doc["tasks"][task]["loss"]
        print(f"[bf16 evaluate] {task}: ours {got:.5f} peft {want:.5f} base {base[task][0]:.5f}")
        assert abs(got - want) <= LOSS_TOL * scale
        assert abs(base[task][0] - want) > LOSS_TOL * scale  # the adapter is applied, not dropped
