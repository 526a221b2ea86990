"""Our task loss equals transformers + PEFT: PeftModel on one right-padded batch of all the task's
examples, labels -100 on prompt and padding, `outputs.loss` (HF's mean over response tokens)."""

from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")

from d2c_jax import data, hf_io, loss, lora as lora_lib, merge  # noqa: E402
from d2c_jax.models.config import load_config  # noqa: E402
from fixtures_adapters import make_peft_adapters  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402
from tolerances import LOSS_RTOL  # noqa: E402

RTOL = LOSS_RTOL  # two float32 implementations of one mean cross-entropy (tolerances.py)
ALL_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# (arch, adapter target modules): MLP adapters (gate/up/down) on every architecture.
CASES = {"llama": ALL_MODULES, "qwen2": ALL_MODULES,
         "stablelm": ("q_proj", "v_proj", "gate_proj", "up_proj", "down_proj")}
EXAMPLES = [  # different prompt and response lengths
    {"prompt": "translate the sentence into french", "response": "the quick brown fox"},
    {"prompt": "one two", "response": "three four five six seven eight nine ten"},
    {"prompt": "question: who wrote the book? answer the question in one short sentence please",
     "response": "the author"},
    {"prompt": "hello", "response": "world"},
]
ADAPTERS = ("a0", "a1", "a2")


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    arch = request.param
    root = tmp_path_factory.mktemp(f"parity_{arch}")
    model_dir = make_tiny_model(os.path.join(root, "base"), arch, seed=5)
    make_peft_adapters(model_dir, os.path.join(root, "adapters"), ADAPTERS, r=4, alpha=8,
                       alphas=[8, 4, 16], target_modules=CASES[arch], seed=2, scale=0.3)
    ddir = os.path.join(root, "data")
    os.makedirs(ddir)
    for name in ADAPTERS:
        with open(os.path.join(ddir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(e) + "\n" for e in EXAMPLES)
    cfg = load_config(model_dir)
    return dict(arch=arch, root=str(root), model_dir=model_dir, data_dir=ddir, cfg=cfg,
                params=hf_io.load_params(model_dir, cfg, "float32"),
                tok=hf_io.load_tokenizer(model_dir),
                adapters=lora_lib.load_adapter_set(os.path.join(root, "adapters"), cfg))


def hf_task_loss(model_dir: str, adapter_dir: str, tok, chat: bool) -> float:
    """The reference: PeftModel forward on one batch of every example, prompt labels -100."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seqs, labels = [], []
    for e in EXAMPLES:
        if chat:
            p = tok.apply_chat_template([{"role": "user", "content": e["prompt"]}],
                                        add_generation_prompt=True, tokenize=True, return_dict=False)
        else:
            p = tok(e["prompt"])["input_ids"]
        r = tok(e["response"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        seqs.append(list(p) + r)
        labels.append([-100] * len(p) + r)
    width = max(map(len, seqs))
    ids = torch.tensor([s + [tok.pad_token_id] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    lab = torch.tensor([x + [-100] * (width - len(x)) for x in labels])
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=attn, labels=lab).loss)


_jit_task_loss = jax.jit(loss.task_loss, static_argnums=1, static_argnames="example_chunk")


def our_task_loss(c, lora, chat: bool, example_chunk=None) -> float:
    td = data.load_task_data(c["data_dir"], ADAPTERS, c["tok"], max_seq_len=128, chat_template=chat)
    first_task = jax.tree.map(lambda x: x[0], td.batch)
    return float(_jit_task_loss(c["params"], c["cfg"], lora, first_task, example_chunk=example_chunk))


def _rel(ours: float, ref: float) -> float:
    return abs(ours - ref) / abs(ref)


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_single_adapter_loss_matches_peft(case, chat):
    i = 1  # alpha 4 / r 4: a scaling other than 2
    lora = lora_lib.effective_lora(case["adapters"], i)
    ours = our_task_loss(case, lora, chat, example_chunk=3 if chat else None)
    ref = hf_task_loss(case["model_dir"], case["adapters"].paths[i], case["tok"], chat)
    print(f"{case['arch']} single chat={chat}: ours {ours:.7f} peft {ref:.7f} rel {_rel(ours, ref):.2e}")
    assert ours == pytest.approx(ref, rel=RTOL)


def test_ties_merged_adapter_loss_matches_peft(case):
    prepared = merge.prepare_merge(case["adapters"], "ties", 0.5)
    merged = jax.tree.map(np.asarray, jax.jit(merge.merge_mask)(prepared, np.ones(3, bool)))
    rank = case["adapters"].rank
    out = lora_lib.save_peft_adapter(os.path.join(case["root"], "merged"), merged, rank=rank,
                                     alpha=rank, base_model_path=case["model_dir"])
    ours = our_task_loss(case, merged, chat=False)
    ref = hf_task_loss(case["model_dir"], out, case["tok"], chat=False)
    print(f"{case['arch']} ties-merged: ours {ours:.7f} peft {ref:.7f} rel {_rel(ours, ref):.2e}")
    assert ours == pytest.approx(ref, rel=RTOL)
    single = our_task_loss(case, lora_lib.effective_lora(case["adapters"], 0), chat=False)
    assert abs(single - ours) > 1e-3  # the merge changes the loss: the comparison has teeth


_jit_packed_loss = jax.jit(loss.packed_task_loss, static_argnums=1, static_argnames="loss_chunk")


@pytest.mark.parametrize("chat", [False, True], ids=["plain", "chat"])
def test_packed_loss_matches_peft(case, chat):
    """The scorer's packed layout (real tokens only through the layers, the LM head on loss
    positions only, optionally in chunks) gives transformers + PEFT's loss."""
    from d2c_jax import packing

    i = 2
    lora = lora_lib.effective_lora(case["adapters"], i)
    td = data.load_task_data(case["data_dir"], ADAPTERS, case["tok"], max_seq_len=128, chat_template=chat)
    pb = jax.tree.map(lambda x: x[0], packing.pack(td.batch))
    ref = hf_task_loss(case["model_dir"], case["adapters"].paths[i], case["tok"], chat)
    for chunk in (None, 5):
        ours = float(_jit_packed_loss(case["params"], case["cfg"], lora, pb, loss_chunk=chunk))
        print(f"{case['arch']} packed chat={chat} chunk={chunk}: ours {ours:.7f} peft {ref:.7f} rel {_rel(ours, ref):.2e}")
        assert ours == pytest.approx(ref, rel=RTOL)
