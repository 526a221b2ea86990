"""Training the suite with optax: base-model pre-training and all task adapters in one vmapped loop.

Both use our decoder and loss (`d2c_jax.loss.task_loss`: HF's mean CE over the weighted
targets) under `jax.grad`. Adapters are raw PEFT
factors (A [L, R, d_in] shared init across tasks, B [L, d_out, R] zero init) on q/k/v/o; the
scaling alpha / r is folded into B only when calling the decoder. The optimiser (AdamW) is
vmapped over the task axis, so every task has its own optimiser state and nothing couples tasks.
Shape legend: T tasks, n examples, B batch, S sequence, L layers, D model dim, V vocab, R rank.
"""

from __future__ import annotations

import functools
import time
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from d2c_jax.loss import task_loss
from d2c_jax.models import decoder
from d2c_jax.models.config import ModelConfig, module_shapes
from d2c_jax.types import Lora, Params, TokenBatch

Log = Callable[[str], None]
# on_step(step done, params or lora, optimiser state, losses so far): the build's checkpoint hook
# (it saves every so many steps and stops the process cleanly after a signal).
OnStep = Callable[[int, Any, Any, list], None]


# ---------------------------------------------------------------------------------------------
# Token arrays.


def pack_rows(rows: Sequence[tuple[Sequence[int], Sequence[float]]], seq_len: int, pad_id: int) -> TokenBatch:
    """rows: (example ids, per-id loss weight of predicting that id). Returns a [n, S] batch in
    data.py's layout (inputs = example[:-1], targets = example[1:])."""
    n = len(rows)
    tokens = np.full((n, seq_len), pad_id, np.int32)
    targets = np.full((n, seq_len), pad_id, np.int32)
    weights = np.zeros((n, seq_len), np.float32)
    attn = np.zeros((n, seq_len), np.int32)
    for i, (ids, w) in enumerate(rows):
        m = len(ids) - 1
        if m > seq_len:
            raise ValueError(f"example of {len(ids)} tokens does not fit seq_len {seq_len}")
        tokens[i, :m] = ids[:-1]
        targets[i, :m] = ids[1:]
        weights[i, :m] = w[1:]
        attn[i, :m] = 1
    return TokenBatch(tokens, targets, weights, attn)


def example_row(prompt_ids: Sequence[int], response_ids: Sequence[int],
                prompt_weight: float = 0.0) -> tuple[list[int], list[float]]:
    """A task example; the loss is on the response tokens (and the prompt's if weighted)."""
    ids = [*prompt_ids, *response_ids]
    return ids, [prompt_weight] * len(prompt_ids) + [1.0] * len(response_ids)


def stack_batches(batches: Sequence[TokenBatch]) -> TokenBatch:
    """[n, S] batches -> one [len(batches), n, S] batch."""
    return jax.tree.map(lambda *xs: np.stack(xs), *batches)


# ---------------------------------------------------------------------------------------------
# Model.


def init_params(cfg: ModelConfig, rng: np.random.Generator, std: float = 0.02) -> dict:
    """Llama params in our layout (docs/architecture.md), N(0, std²) weights, unit norms;
    the residual-output projections are scaled down by sqrt(2 L) (GPT-2 style). numpy's
    generator: eager jax.random calls would cost seconds of dispatch for these few arrays."""
    shapes = module_shapes(cfg)
    n, d = cfg.num_layers, cfg.hidden_size
    layers = {}
    for m in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        d_in, d_out = shapes[m]
        s = std / np.sqrt(2 * n) if m in ("o_proj", "down_proj") else std
        layers[m] = {"kernel": (s * rng.standard_normal((n, d_in, d_out))).astype(np.float32)}
    layers["input_norm"] = {"scale": np.ones((n, d), np.float32)}
    layers["post_attn_norm"] = {"scale": np.ones((n, d), np.float32)}
    params = {
        "embed": (std * rng.standard_normal((cfg.vocab_size, d))).astype(np.float32),
        "layers": layers,
        "final_norm": {"scale": np.ones((d,), np.float32)},
    }
    if not cfg.tie_embeddings:
        params["lm_head"] = (std * rng.standard_normal((d, cfg.vocab_size))).astype(np.float32)
    return jax.tree_util.tree_map(jnp.asarray, params)


def concept_embeddings(word_ids_lc: np.ndarray, vocab_size: int, dim: int, rng: np.random.Generator, *,
                       std: float = 0.02, concept_std: float = 0.05, language_std: float = 0.03) -> jax.Array:
    """[V, D] embeddings where the word of concept c in language l starts as
    concept_c + language_l + noise: a base model that already "knows" which words of different
    languages mean the same thing, so a skill learnt in one language can transfer to another
    (as in a real multilingual LLM). word_ids_lc: int[L, C] token id of each (language, concept)."""
    n_lang, n_con = word_ids_lc.shape
    emb_vd = std * rng.standard_normal((vocab_size, dim))
    con_cd = concept_std * rng.standard_normal((n_con, dim))
    lang_ld = language_std * rng.standard_normal((n_lang, dim))
    emb_vd[word_ids_lc] = con_cd[None, :, :] + lang_ld[:, None, :] + 0.5 * emb_vd[word_ids_lc]
    return jnp.asarray(emb_vd.astype(np.float32))


def _schedule(lr: float, steps: int, warmup: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, lr, max(1, warmup), max(steps, warmup + 1), lr * 0.1)


# ---------------------------------------------------------------------------------------------
# Pre-training.


@functools.lru_cache(maxsize=8)
def _pretrain_step(cfg: ModelConfig, lr: float, steps: int, warmup: int, weight_decay: float):
    """(optimizer, jitted step), cached so that equal settings compile once per process."""
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(_schedule(lr, steps, warmup), weight_decay=weight_decay))

    @jax.jit
    def step(params, state, batch_bs: TokenBatch):
        loss, grads = jax.value_and_grad(task_loss)(params, cfg, None, batch_bs)
        updates, state = opt.update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss

    return opt, step


def pretrain_state(cfg: ModelConfig, params: Params, lr: float, steps: int, warmup: int = 20,
                   weight_decay: float = 0.01) -> Any:
    """The initial optimiser state of `pretrain` (the template a checkpoint is restored into)."""
    return _pretrain_step(cfg, float(lr), steps, warmup, float(weight_decay))[0].init(params)


def adapter_state(cfg: ModelConfig, lora_raw: Lora, scaling: float, lr: float, steps: int, warmup: int = 20,
                  weight_decay: float = 0.0) -> Any:
    """The initial (vmapped) optimiser state of `train_adapters`."""
    opt = _adapter_step(cfg, float(scaling), float(lr), steps, warmup, float(weight_decay))[0]
    return jax.vmap(opt.init)(lora_raw)


def pretrain(cfg: ModelConfig, params: Params, batches: TokenBatch, *, lr: float, weight_decay: float = 0.01,
             warmup: int = 20, log: Log | None = None, log_every: int = 50, resume: tuple | None = None,
             on_step: OnStep | None = None) -> tuple[dict, list[float]]:
    """Full-parameter AdamW on `batches` ([steps, B, S] leaves). Returns (params, losses).
    `resume`: (steps done, params, optimiser state, losses) of a checkpoint to continue from (the
    same steps follow, so the result is bit-identical to an uninterrupted run)."""
    steps = batches.tokens.shape[0]
    opt, step = _pretrain_step(cfg, float(lr), steps, warmup, float(weight_decay))
    state = opt.init(params)
    done, losses = 0, []
    if resume is not None:
        done, params, state, losses = resume
        losses = list(losses)
    t0 = time.time()
    for i in range(done, steps):
        params, state, loss = step(params, state, jax.tree.map(lambda x: x[i], batches))
        losses.append(loss)
        if log and ((i + 1) % log_every == 0 or i + 1 == steps):
            log(f"pretrain step {i + 1}/{steps} loss {float(loss):.3f} ({time.time() - t0:.1f}s)")
        if on_step is not None:
            on_step(i + 1, params, state, losses)
    return params, [float(x) for x in losses]


# ---------------------------------------------------------------------------------------------
# Adapters.


def init_lora(cfg: ModelConfig, modules: Sequence[str], rank: int, num_tasks: int,
              rng: np.random.Generator) -> dict:
    """Raw PEFT factors for T tasks: one SHARED A init (PEFT's kaiming-uniform(a=sqrt(5)),
    i.e. U(-1/sqrt(d_in), 1/sqrt(d_in))) broadcast to every task, B = 0."""
    shapes = module_shapes(cfg)
    out = {}
    for m in modules:
        d_in, d_out = shapes[m]
        bound = 1.0 / np.sqrt(d_in)
        a_lrd = rng.uniform(-bound, bound, (cfg.num_layers, rank, d_in)).astype(np.float32)
        out[m] = {"a": jnp.asarray(np.broadcast_to(a_lrd, (num_tasks, *a_lrd.shape))),
                  "b": jnp.zeros((num_tasks, cfg.num_layers, d_out, rank), jnp.float32)}
    return out


def scaled(lora_raw: dict, scaling: float) -> dict:
    """The decoder's lora tree: scaling folded into b."""
    return {m: {"a": v["a"], "b": v["b"] * scaling} for m, v in lora_raw.items()}


@functools.lru_cache(maxsize=8)
def _adapter_step(cfg: ModelConfig, scaling: float, lr: float, steps: int, warmup: int, weight_decay: float):
    """(optimizer, jitted step) for T adapters at once, cached per settings."""
    opt = optax.adamw(_schedule(lr, steps, warmup), weight_decay=weight_decay)

    def total_loss(lora, params, batch_tbs: TokenBatch):
        def one_task(lora_t, batch_bs: TokenBatch):
            return task_loss(params, cfg, scaled(lora_t, scaling), batch_bs)

        losses_t = jax.vmap(one_task)(lora, batch_tbs)
        return jnp.sum(losses_t), losses_t

    @jax.jit
    def step(lora, state, params, batch_tbs: TokenBatch):
        grads, losses_t = jax.grad(total_loss, has_aux=True)(lora, params, batch_tbs)
        updates, state = jax.vmap(opt.update)(grads, state, lora)
        return optax.apply_updates(lora, updates), state, losses_t

    return opt, step


def train_adapters(cfg: ModelConfig, params: Params, lora_raw: Lora, batches: TokenBatch, *, scaling: float,
                   lr: float, warmup: int = 20, weight_decay: float = 0.0, log: Log | None = None,
                   log_every: int = 50, resume: tuple | None = None,
                   on_step: OnStep | None = None) -> tuple[dict, np.ndarray]:
    """Trains T adapters at once; `batches` leaves are [steps, T, B, S], the base is frozen.

    Each task's loss depends only on its own adapter and the AdamW update is vmapped over T, so
    this equals T independent trainings. Returns (lora_raw, losses [steps, T]). `resume`, `on_step`:
    as in `pretrain`."""
    steps = batches.tokens.shape[0]
    opt, step = _adapter_step(cfg, float(scaling), float(lr), steps, warmup, float(weight_decay))
    state = jax.vmap(opt.init)(lora_raw)
    done, losses = 0, []
    if resume is not None:
        done, lora_raw, state, losses = resume
        losses = list(losses)
    t0 = time.time()
    for i in range(done, steps):
        lora_raw, state, losses_t = step(lora_raw, state, params, jax.tree.map(lambda x: x[i], batches))
        losses.append(losses_t)
        if log and ((i + 1) % log_every == 0 or i + 1 == steps):
            log(f"adapter step {i + 1}/{steps} mean loss {float(jnp.mean(losses_t)):.3f} "
                f"({time.time() - t0:.1f}s)")
        if on_step is not None:
            on_step(i + 1, lora_raw, state, losses)
    return lora_raw, np.asarray(jnp.stack(losses))


# ---------------------------------------------------------------------------------------------
# Measuring the suite.


@functools.partial(jax.jit, static_argnums=(0,))
def _per_task_losses(cfg: ModelConfig, params: Params, lora: Lora, data_tns: TokenBatch):
    """Loss and token accuracy [T] of one adapter on every task."""
    tokens_tns, targets_tns, weights_tns, attn_tns = data_tns.tokens, data_tns.targets, data_tns.weights, data_tns.attn
    t, n, s = tokens_tns.shape
    logits = decoder.forward(params, cfg, tokens_tns.reshape(t * n, s), attn_tns.reshape(t * n, s), lora)
    logp_tnsv = jax.nn.log_softmax(logits, axis=-1).reshape(t, n, s, -1)
    nll_tns = -jnp.take_along_axis(logp_tnsv, targets_tns[..., None], axis=-1)[..., 0]
    hit_tns = (jnp.argmax(logp_tnsv, axis=-1) == targets_tns).astype(jnp.float32)
    count_t = jnp.maximum(jnp.sum(weights_tns, axis=(1, 2)), 1.0)
    return (jnp.sum(nll_tns * weights_tns, axis=(1, 2)) / count_t,
            jnp.sum(hit_tns * weights_tns, axis=(1, 2)) / count_t)


def cross_losses(cfg: ModelConfig, params: Params, lora_raw: Lora, data: TokenBatch, *,
                 scaling: float) -> tuple[np.ndarray, np.ndarray]:
    """Loss and teacher-forced token accuracy of every adapter (and of the bare base model) on
    every task's examples (data leaves [T, n, S]).

    Returns (loss [1 + A, T], accuracy [1 + A, T]); row 0 is zero-shot (the adapters' B set to
    zero, which is exactly the base model), row 1 + i adapter i."""
    data = jax.tree.map(jnp.asarray, data)
    num = jax.tree_util.tree_leaves(lora_raw)[0].shape[0]
    first = jax.tree_util.tree_map(lambda x: x[0], lora_raw)
    rows = [_per_task_losses(cfg, params, {m: {"a": v["a"], "b": jnp.zeros_like(v["b"])}
                                           for m, v in first.items()}, data)]
    for i in range(num):
        one = scaled(jax.tree_util.tree_map(lambda x: x[i], lora_raw), scaling)
        rows.append(_per_task_losses(cfg, params, one, data))
    return np.stack([np.asarray(r[0]) for r in rows]), np.stack([np.asarray(r[1]) for r in rows])
