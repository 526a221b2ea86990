"""Mutation check: does the test suite catch deliberate one-line bugs?

  python tools/mutation_check.py [--only NAME,NAME] [--list]

For each mutation below: copy the repository (without .git, virtual environments and run outputs)
into a temporary directory, apply the edit (the original text must occur exactly once), run the
named tests there with pytest (PYTHONPATH = the copy, so the copy's d2c_jax is imported), and
report CAUGHT (the tests fail) or MISSED (they pass). The unmutated copy is run first on every
selected test, so a test that fails anyway cannot count as a catch. Exit status 1 if any
mutation is missed. Not collected by pytest (tools/ is outside tests/).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "runs", "__pycache__", "*.egg-info", ".pytest_cache", "docs")


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    path: str  # file to edit, relative to the repository root
    old: str  # must occur exactly once
    new: str
    tests: tuple[str, ...]  # pytest node ids / -k expressions: "file::test" or "file -k expr"


MUTATIONS = (
    Mutation("ties sign election picks the minority sign", "d2c_jax/merge_common.py",
             "majority_pos = masked_sum(m_n, x_n, unroll) >= 0", "majority_pos = masked_sum(m_n, x_n, unroll) < 0",
             ("tests/test_merge_parity.py -k matches_peft_add_weighted_adapter and ties-ties",)),
    Mutation("loss mask covers the prompt too", "d2c_jax/data.py",
             "weights[ti, ei, max(len(p_ids) - 1, 0) : m] = 1.0", "weights[ti, ei, :m] = 1.0",
             ("tests/test_chat_templates.py -k token_arrays",)),
    Mutation("prompt truncated from the right", "d2c_jax/data.py",
             "p_ids = p_ids[len(p_ids) + len(r_ids) - max_seq_len :]", "p_ids = p_ids[: max_seq_len - len(r_ids)]",
             ("tests/test_chat_templates.py -k long_prompt",)),
    Mutation("RMSNorm statistics in bf16 (no float32 upcast)", "d2c_jax/models/decoder.py",
             "x32 = x_bsd.astype(jnp.float32)\n    y = x32 * jax.lax.rsqrt", "x32 = x_bsd\n    y = x32 * jax.lax.rsqrt",
             ("tests/test_bf16_parity.py -k norms and llama",)),
    Mutation("LayerNorm statistics in bf16 (no float32 upcast)", "d2c_jax/models/decoder.py",
             "x32 = x_bsd.astype(jnp.float32)\n    mu =", "x32 = x_bsd\n    mu =",
             ("tests/test_bf16_parity.py -k norms and stablelm",)),
    Mutation("LoRA delta dropped for bf16 activations", "d2c_jax/models/decoder.py",
             "    if lora_m is not None:\n", "    if lora_m is not None and x_bsi.dtype == jnp.float32:\n",
             ("tests/test_bf16_parity.py -k lora_logits and llama",)),
    Mutation("ROUGE-1 reported as ROUGE-L", "d2c_jax/metrics.py",
             'return 100.0 * _ROUGE.score(reference, prediction)["rougeL"].fmeasure',
             'return 100.0 * rouge_scorer.RougeScorer(["rouge1"], tokenizer=_UnicodeTokenizer())'
             '.score(reference, prediction)["rouge1"].fmeasure',
             ("tests/test_metric_values.py -k rouge_l_is",)),
    Mutation("ROUGE-L recall reported as F", "d2c_jax/metrics.py",
             '["rougeL"].fmeasure', '["rougeL"].recall',
             ("tests/test_metric_values.py -k rouge_l_is",)),
    Mutation("SQuAD recall reported as F1", "d2c_jax/metrics.py",
             "return 100.0 * 2 * precision * recall / (precision + recall)", "return 100.0 * recall",
             ("tests/test_metric_values.py -k squad",)),
    Mutation("generations scored against the prompts", "d2c_jax/evaluation.py",
             "zip(self.metrics, preds, self.task_data.responses)", "zip(self.metrics, preds, self.task_data.prompts)",
             ("tests/test_metric_values.py -k report_evaluation",)),
    Mutation("DARE keeps with probability density**2", "d2c_jax/merge_factor.py",
             "keep = rng.random(x.shape) < density", "keep = rng.random(x.shape) < density * density",
             ("tests/test_merge_parity.py -k dare_keeps",)),
    Mutation("DARE does not rescale by 1/density", "d2c_jax/merge_factor.py",
             "np.where(keep, x / np.float32(density), np.zeros((), x.dtype))", "np.where(keep, x, np.zeros((), x.dtype))",
             ("tests/test_merge_parity.py -k dare_keeps",)),
    Mutation("magnitude trim keeps density**2 of the entries", "d2c_jax/merge_factor.py",
             "k = int(density * flat.shape[1])  # PEFT", "k = int(density * density * flat.shape[1])  # PEFT",
             ("tests/test_merge_parity.py -k density_0_3 and magnitude_prune",)),
    # (A constant shift of every position is invisible: rotary attention depends on differences.)
    Mutation("decode-step position ids ignore left padding", "d2c_jax/generate.py",
             "pos_b1 = (n_real_b + j)[:, None]", "pos_b1 = (p + j)[:, None]",
             ("tests/test_generate.py -k without_eos and llama-left",)),
    Mutation("prompt position ids ignore padding", "d2c_jax/models/decoder.py",
             "return jnp.maximum(jnp.cumsum(attn_mask_bs.astype(jnp.int32), axis=-1) - 1, 0)",
             "return jnp.broadcast_to(jnp.arange(attn_mask_bs.shape[-1]), attn_mask_bs.shape)",
             ("tests/test_generate.py -k without_eos and llama-left",)),
    Mutation("rslora scaling alpha / r", "d2c_jax/lora.py",
             "scaling=alpha / math.sqrt(r) if rslora else alpha / r", "scaling=alpha / r",
             ("tests/test_merge_parity.py -k matches_peft_add_weighted_adapter and linear",)),
    Mutation("llama3 rope scaling ignored for low frequencies", "d2c_jax/models/decoder.py",
             "scaled = np.where(wavelen > low_wl, inv / factor, inv)", "scaled = inv",
             ("tests/test_model_parity.py -k logits_match and llama_tied_rope_llama3",)),
    Mutation("qkv bias skipped on cached decode steps", "d2c_jax/models/decoder.py",
             '    if "bias" in p:\n        y = y + p["bias"].astype(jnp.float32)',
             '    if "bias" in p and x_bsi.shape[1] > 1:\n        y = y + p["bias"].astype(jnp.float32)',
             ("tests/test_generate.py -k without_eos and qwen2-left",)),
    Mutation("only the first of several EOS ids stops a row", "d2c_jax/generate.py",
             "done_b = done_b | jnp.isin(tok_b, eos_arr)", "done_b = done_b | (tok_b == eos_arr[0])",
             ("tests/test_generate.py -k eos_ids",)),
    # Code of the last month: search engine, population, loss cache, speculation, checkpoints,
    # fingerprints, adapter loading, budget, scoring, packing, data (each caught by a test of its
    # class: tests/test_search_engine.py, test_strategies.py, test_loss_cache.py, ...).
    Mutation("gathered merge takes one slot past the members", "d2c_jax/scoring.py",
             "np.arange(g) < len(idx))", "np.arange(g) <= len(idx))",
             ("tests/test_scoring.py -k more_adapters_than",)),
    Mutation("speculated evaluations missing from the iteration's row", "d2c_jax/search.py",
             "    stats.evaluations += spec_stats.evaluations\n", "    stats.seconds += 0.0\n",
             ("tests/test_search_engine.py -k evaluations_recorded",)),
    Mutation("tracking evaluations missing from the iteration's row", "d2c_jax/search.py",
             "        stats += track_stats\n", "        track_stats = track_stats\n",
             ("tests/test_search_engine.py -k evaluations_recorded",)),
    Mutation("exchange replaces round(P / 4) chains", "d2c_jax/strategies/population.py",
             "max(1, int(population * EXCHANGE_FRACTION))", "max(1, round(population * EXCHANGE_FRACTION))",
             ("tests/test_strategies.py -k exchange_copies",)),
    Mutation("best chain may be a NaN chain", "d2c_jax/strategies/population.py",
             "return int(np.argmin(np.nan_to_num(objectives_p, nan=np.inf)))", "return int(np.argmin(objectives_p))",
             ("tests/test_strategies.py -k exchange_copies",)),
    Mutation("exchange ranks NaN objectives best", "d2c_jax/strategies/population.py",
             "np.lexsort((np.arange(len(objectives_p)), np.nan_to_num(objectives_p, nan=np.inf)))",
             "np.lexsort((np.arange(len(objectives_p)), np.nan_to_num(objectives_p, nan=-np.inf)))",
             ("tests/test_strategies.py -k exchange_copies",)),
    Mutation("exchange pairs the i-th best with the i-th least bad", "d2c_jax/strategies/population.py",
             "best, worst = order_p[:count], order_p[::-1][:count]", "best, worst = order_p[:count], order_p[-count:]",
             ("tests/test_strategies.py -k exchange_copies",)),
    Mutation("a NaN gain counts as an improvement", "d2c_jax/search.py",
             "            if g > best_gain:", "            if not g <= best_gain:",
             ("tests/test_search_engine.py -k nan_objective",)),
    Mutation("chains share proposal streams", "d2c_jax/search.py",
             "rng = d2c.stream(settings.seed, d2c.STREAM_PROPOSE, it, p)",
             "rng = d2c.stream(settings.seed, d2c.STREAM_PROPOSE, it, p % 4)",
             ("tests/test_search_engine.py -k own_stream",)),
    Mutation("initial partitions depend on the population size", "d2c_jax/strategies/d2c.py",
             "draw(stream(seed, STREAM_INIT, p), num_adapters, num_clusters)",
             "draw(stream(seed, STREAM_INIT, p, population), num_adapters, num_clusters)",
             ("tests/test_search_engine.py -k own_stream",)),
    Mutation("a resumed run keeps the checkpoint's cache bound", "d2c_jax/search.py",
             "    state.cache.max_size = settings.cache_size", "    state.cache.max_size = state.cache.max_size",
             ("tests/test_loss_cache.py -k smaller_cache",)),
    Mutation("a resumed run is not evicted down to a smaller cache", "d2c_jax/search.py",
             "    state.cache.evict()\n", "    state.cache.max_size += 0\n",
             ("tests/test_loss_cache.py -k smaller_cache",)),
    Mutation("--cache_size refuses a resume", "d2c_jax/run_config.py",
             '"budget", "budget_mb", "budget_ranks",', '"budget", "budget_mb", "budget_ranks", "cache_size",',
             ("tests/test_launch_search.py -k preempted_run",)),
    Mutation("fingerprint misses the sharded checkpoint's index", "d2c_jax/fingerprint.py",
             '_WEIGHT_SUFFIXES = (".safetensors", ".safetensors.index.json")', '_WEIGHT_SUFFIXES = (".safetensors",)',
             ("tests/test_checkpoint.py -k every_input_file",)),
    Mutation("fingerprint misses config.json", "d2c_jax/fingerprint.py",
             'n == "config.json" or ', "",
             ("tests/test_checkpoint.py -k every_input_file",)),
    Mutation("fingerprint misses adapter_config.json", "d2c_jax/fingerprint.py",
             'for name in ("adapter_config.json", "adapter_model.safetensors"):', 'for name in ("adapter_model.safetensors",):',
             ("tests/test_checkpoint.py -k every_input_file",)),
    Mutation("fingerprint hashes only the first tokenizer file", "d2c_jax/fingerprint.py",
             "tokenizer = [n for n in names if n in TOKENIZER_FILES]", "tokenizer = [n for n in names if n in TOKENIZER_FILES][:1]",
             ("tests/test_checkpoint.py -k every_input_file",)),
    Mutation("omitted lora_alpha defaults to 16 (not PEFT's 8)", "d2c_jax/lora.py",
             '"r": 8, "lora_alpha": 8,', '"r": 8, "lora_alpha": 16,',
             ("tests/test_lora_io.py -k omits",)),
    Mutation("omitted target_modules default to q_proj only", "d2c_jax/lora.py",
             '"target_modules": ["q_proj", "v_proj"]}', '"target_modules": ["q_proj"]}',
             ("tests/test_lora_io.py -k omits",)),
    Mutation("budget counts d_in twice per rank", "d2c_jax/budget.py",
             "total += adapter_set.a[m].shape[1] * (d_in + d_out)", "total += adapter_set.a[m].shape[1] * (d_in + d_in)",
             ("tests/test_budget.py",)),
    Mutation("budget counts every input adapter at the largest rank", "d2c_jax/budget.py",
             "(adapted_nl.sum(axis=1) * np.asarray(adapter_set.ranks)).sum()",
             "(adapted_nl.sum(axis=1) * adapter_set.rank).sum()",
             ("tests/test_budget.py",)),
    Mutation("loss cache hits are not refreshed (FIFO, not LRU)", "d2c_jax/search.py",
             "self._losses[k] = self._losses.pop(k)", "self._losses[k] = self._losses[k]",
             ("tests/test_loss_cache.py -k least_recently_used",)),
    Mutation("restored loss cache in reverse LRU order", "d2c_jax/search.py",
             "for mask_n, task, loss in zip(np.asarray(masks_qn, bool), tasks_q, np.asarray(losses_q, np.float32)):",
             "for mask_n, task, loss in reversed(list(zip(np.asarray(masks_qn, bool), tasks_q, "
             "np.asarray(losses_q, np.float32)))):",
             ("tests/test_loss_cache.py -k checkpointed_cache or smaller_cache",)),
    Mutation("speculation depth without the Laplace prior", "d2c_jax/search.py",
             "rate = (accepted + 1) / (chains + 2)", "rate = (accepted + 1) / (chains + 1)",
             ("tests/test_search_engine.py -k speculation_depth_follows",)),
    Mutation("a move may target its own cluster", "d2c_jax/strategies/d2c.py",
             "dst += dst >= src", "dst += dst > src",
             ("tests/test_search_engine.py -k sample_move",)),
    Mutation("the paper's source cluster drawn in proportion to its size", "d2c_jax/strategies/d2c.py",
             "src = int(sources_k[rng.integers(len(sources_k))])",
             "src = int(rng.choice(sources_k, p=sizes_k[sources_k] / sizes_k[sources_k].sum()))",
             ("tests/test_search_engine.py -k sample_move",)),
    Mutation("the engine ignores --proposal", "d2c_jax/search.py",
             "settings.num_clusters, settings.proposal)", "settings.num_clusters)",
             ("tests/test_search_engine.py -k algorithm1_exactly",)),
    Mutation("the evaluation's random start ignores the run's --start", "d2c_jax/evaluation.py",
             'start = read_run(cfg.run_dir).get("start", "random") if cfg.run_dir else "random"',
             'start = "random"',
             ("tests/test_finished_run.py -k references_equal",)),
    Mutation("the engine ignores --start", "d2c_jax/search.py",
             "settings.seed,\n                                           settings.start)",
             "settings.seed)",
             ("tests/test_search_engine.py -k round_robin_start",)),
    Mutation("an uncommitted checkpoint step counts", "d2c_jax/checkpoint.py",
             "if not os.path.isfile(os.path.join(self.directory, str(step), COMMITTED)):",
             "if not os.path.isdir(os.path.join(self.directory, str(step))):",
             ("tests/test_checkpoint.py -k walks_back",)),
    Mutation("another run's checkpoint is skipped, not refused", "d2c_jax/checkpoint.py",
             "            except UserError:\n                raise\n",
             "            except UserError:\n                continue\n",
             ("tests/test_checkpoint.py -k another_run",)),
    Mutation("dummy rows count as examples", "d2c_jax/data.py",
             "num_examples=np.array([len(r) for r in per_task], np.int32),",
             "num_examples=np.full(len(per_task), n, np.int32),",
             ("tests/test_tune.py -k unequal_numbers",)),
    Mutation("packed targets are the input tokens", "d2c_jax/packing.py",
             'out["targets"][ti, :len(at)] = targets[ti].reshape(-1)[grid][at]',
             'out["targets"][ti, :len(at)] = tokens[ti].reshape(-1)[grid][at]',
             ("tests/test_loss_parity.py -k packed_loss_matches_peft",)),
    Mutation("the rematerialised loss's position blocks mix up examples", "d2c_jax/loss.py",
             "blocks = (h_bsd.reshape(b, k, p, -1).swapaxes(0, 1),",
             "blocks = (h_bsd.reshape(k, b, p, -1),",
             ("tests/test_tune_remat.py -k plain_loss_value",)),
    Mutation("the rematerialised loss skips the last position block", "d2c_jax/loss.py",
             "    k = -(-s // p)\n    pad = k * p - s\n    tgt_bs = chunk.targets",
             "    k = s // p\n    pad = 0\n    h_bsd = h_bsd[:, :k * p]\n    tgt_bs, w_bs = chunk.targets[:, :k * p], w_bs[:, :k * p]",
             ("tests/test_tune_remat.py -k plain_loss_value",)),
    Mutation("tuning rematerialises only below the threshold", "d2c_jax/tune.py",
             "return backward_bytes(cfg, fit) > REMAT_ABOVE_BYTES", "return backward_bytes(cfg, fit) < REMAT_ABOVE_BYTES",
             ("tests/test_tune_remat.py -k chosen_by",)),
)


def _pytest_args(spec: str) -> list[str]:
    if " -k " in spec:
        path, expr = spec.split(" -k ", 1)
        return [path, "-k", expr]
    return [spec]


def _run_tests(root: str, specs, timeout: int) -> tuple[bool, str]:
    """True if every selected test passes (and at least one ran) in the tree at `root`."""
    env = dict(os.environ, PYTHONPATH=root)
    for spec in specs:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *_pytest_args(spec)]
        try:
            proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"{spec}: timed out"
        tail = proc.stdout.strip().splitlines()[-1:] or [""]
        if proc.returncode == 5:
            raise SystemExit(f"no test selected by {spec!r}")
        if proc.returncode != 0:
            return False, f"{spec}: {tail[0]}"
    return True, "passed"


def _copy(dest: str) -> str:
    root = os.path.join(dest, "repo")
    shutil.copytree(REPO, root, ignore=_IGNORE)
    return root


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated substrings of mutation names")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per pytest run")
    args = parser.parse_args()
    selected = [m for m in MUTATIONS if not args.only or any(s in m.name for s in args.only.split(","))]
    if args.list:
        for m in selected:
            print(f"{m.name}  [{m.path}]  tests: {'; '.join(m.tests)}")
        return 0
    with tempfile.TemporaryDirectory(prefix="d2c_mutation_") as tmp:
        clean = _copy(tmp)
        specs = sorted({s for m in selected for s in m.tests})
        ok, why = _run_tests(clean, specs, args.timeout)
        if not ok:
            print(f"the unmutated tests fail ({why}); fix them first", file=sys.stderr)
            return 2
        missed = []
        for m in selected:
            with open(os.path.join(clean, m.path), encoding="utf-8") as f:
                text = f.read()
            if text.count(m.old) != 1:
                print(f"ERROR {m.name}: the original text occurs {text.count(m.old)} times in {m.path}")
                missed.append(m.name)
                continue
            start = time.time()
            with open(os.path.join(clean, m.path), "w", encoding="utf-8") as f:
                f.write(text.replace(m.old, m.new))
            try:
                passed, why = _run_tests(clean, m.tests, args.timeout)
            finally:
                with open(os.path.join(clean, m.path), "w", encoding="utf-8") as f:
                    f.write(text)
            verdict = "MISSED" if passed else "CAUGHT"
            if passed:
                missed.append(m.name)
            print(f"{verdict:6s} {m.name} ({time.time() - start:.0f} s; {why})", flush=True)
    print(f"{len(selected) - len(missed)}/{len(selected)} mutations caught")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
