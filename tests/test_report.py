"""experiments/report: a tiny report run has every Table 1 row, the cluster-count and ARI sections."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")

from sklearn.metrics import adjusted_rand_score  # noqa: E402

from d2c_jax import lora as lora_lib  # noqa: E402
from experiments import report  # noqa: E402
from experiments.report import render  # noqa: E402
from d2c_jax.errors import UserError  # noqa: E402
from d2c_jax.models.config import load_config  # noqa: E402
from fixtures_models import make_tiny_model  # noqa: E402

FAMILIES = ("copy", "swap")
LANGUAGES = ("xx", "yy", "zz")
# Two operators, the second with tuned factors too: linear is also the compared merge, so its
# programs are compiled once for both sections (any operator runs the same section code).
OPERATORS = ("ties", "linear")
WORDS = ["one", "two", "three", "four", "five", "six", "the", "fox", "dog", "world"]


def make_tiny_suite(root: str) -> str:
    """A suite-shaped directory (base/, adapters/, data/ with tags) of 2 families × 3 languages,
    random adapters: what the report needs, built in about a second."""
    base = make_tiny_model(os.path.join(root, "base"), "llama", seed=5)
    cfg = load_config(base)
    rng = np.random.default_rng(0)
    data_dir = os.path.join(root, "data")
    os.makedirs(data_dir)
    meta = {}
    for fi, fam in enumerate(FAMILIES):
        for li, lang in enumerate(LANGUAGES):
            task = f"{fam}_{lang}"
            lora = {}
            for m, (d_in, d_out) in (("q_proj", (64, 64)), ("v_proj", (64, 32))):
                lora[m] = {"a": rng.normal(0, 0.3, (cfg.num_layers, 4, d_in)).astype(np.float32),
                           "b": rng.normal(0, 0.3, (cfg.num_layers, d_out, 4)).astype(np.float32)}
            lora_lib.save_peft_adapter(os.path.join(root, "adapters", task), lora, rank=4, alpha=8,
                                       base_model_path=base)
            for split, count in (("", 3), (".eval", 2)):
                with open(os.path.join(data_dir, f"{task}{split}.jsonl"), "w") as f:
                    for e in range(count):
                        words = [WORDS[(fi + li + e + j) % len(WORDS)] for j in range(3)]
                        out = words if fam == "copy" else words[1::-1] + words[2:]
                        f.write(json.dumps({"prompt": f"{fam} {lang} : {' '.join(words)} =",
                                            "response": " ".join(out)}) + "\n")
            meta[task] = {"metric": "exact_match" if fam == "copy" else "rouge_l",
                          "tags": {"family": fam, "language": lang}}
    with open(os.path.join(data_dir, "tasks.json"), "w") as f:
        json.dump(meta, f)
    with open(os.path.join(root, "suite.json"), "w") as f:  # the hashes a built suite records
        json.dump({"settings_hash": "5e" * 32, "weights_hash": "3a" * 32}, f)
    return root


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    root = make_tiny_suite(str(tmp_path_factory.mktemp("suite")))
    out_dir = str(tmp_path_factory.mktemp("report"))
    cfg = report.ReportConfig(
        suite=root, output_dir=out_dir, seeds=1, num_clusters=2, iterations=3,
        cluster_counts=(1, 2), count_strategies=("d2c", "random"), count_seeds=1, population=2,
        proposals=2, compare_merges=("linear",), long_iterations=6, max_new_tokens=3, batch_size=8,
        # generation_batch_size=2: every task has 2 eval examples, so each adapter's rows decode
        # in calls of 2 and one generation program serves every run (the batch size is no input
        # of a result; batches of 2 to 16 rows compiled one program each, ~10 s apiece).
        generation_batch_size=2, operators=OPERATORS, tune_steps=2, tune_operators=OPERATORS,
        factor_steps=2, factor_operators=OPERATORS[1:], fresh_long_steps=3, fresh_long_patience=3,
        scale_operator="linear",  # already compiled here (core_ta's exact-sum row: a test below)
        command="python launch/report.py --suite=TINY",
    )
    res = report.run_report(cfg)
    written = report.write_report(res, out_dir)
    with open(written["markdown"], encoding="utf-8") as f:
        md = f.read()
    return res, written, md


def _section(md: str, title: str) -> str:
    start = md.index(title)
    end = md.find("\n## ", start + 1)
    return md[start:end if end >= 0 else None]


def test_table1_has_every_row_with_storage(tiny_report):
    res, written, md = tiny_report
    assert "python launch/report.py --suite=TINY" in md  # the command that made it
    table = _section(md, "## Table 1").split("\n\n")[1]  # the first table of the section
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    labels = [r["label"] for r in report.table1_rows(res)]
    assert len(labels) == 8 and all(label in rows for label in labels)
    assert rows["Zero-shot (base model)"][1] == "0.0"
    assert rows["Single-task adapters (upper bound)"][:2] == ["6", "100.0"]
    assert rows["All-in-one merge"][:2] == ["1", "16.7"]
    for key in ("Random clusters", "K-means (A, B)", "D²C paper (P=1, M=1, local)"):
        assert rows[key][:2] == ["2", "33.3"]
        assert float(rows[key][2]) >= 0.0 and float(rows[key][4]) > 0.0  # score, eval loss
    for role in ("table", "clusters", "assignment"):
        with open(written[role], "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_table1_s_score_is_each_runs_mean_ratio_to_the_single_task_scores(tiny_report):
    """Every run's S-score (results.json) and Table 1's S-score cells are the mean over tasks of (the
    run's task score) / (the single-task adapters' task score), tasks whose single-task score is 0
    left out. The tiny suite's random adapters score 0 everywhere, so the runs' per-task scores are
    replaced by chosen ones (one single-task 0) and the expected values computed here by hand."""
    res, _, _ = tiny_report
    single = (40.0, 0.0, 25.0, 10.0, 50.0, 20.0)
    runs = []
    for i, r in enumerate(res.runs):
        scores = single if r.key == "single" else tuple(float((7 * i + 3 * t) % 11) for t in range(6))
        runs.append(dataclasses.replace(r, task_scores=scores))
    res = dataclasses.replace(res, runs=runs)

    def want(scores):
        ratios = [scores[t] / single[t] for t in (0, 2, 3, 4, 5)]
        return sum(ratios) / 5

    doc = render.result_json(res)
    for r in doc["runs"]:
        # float64 means of 5 ratios summed in another order: ~1e-16 relative; 1e-12 is the bound.
        assert r["s_score"] == pytest.approx(want(r["task_scores"]), rel=1e-12, abs=0)
    table = _section(render.render_markdown(res), "## Table 1").split("\n\n")[1]
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in table.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["Single-task adapters (upper bound)"][3] == "1.000"
    for key, label in (("d2c", "D²C paper (P=1, M=1, local)"), ("all_in_one", "All-in-one merge")):
        (run,) = res.select(key, 1 if key == "all_in_one" else 2)
        assert rows[label][3] == f"{want(run.task_scores):.3f}"  # one seed: the value itself


def test_setup_names_the_suites_settings_and_weights_hashes(tiny_report):
    """Two reports are comparable when they name the same weights (suite.json's weights_hash)."""
    _, written, md = tiny_report
    assert f"(suite.json settings hash {'5e' * 6}, weights hash {'3a' * 6})" in _section(md, "## Setup")
    with open(written["json"], encoding="utf-8") as f:
        assert json.load(f)["suite_weights_hash"] == "3a" * 6


def test_cluster_counts_and_ari_sections(tiny_report):
    res, written, md = tiny_report
    counts = _section(md, "## Score vs number of clusters")
    assert "| 1 | 16.7 |" in counts and "| 2 | 33.3 |" in counts
    ari_md = _section(md, "## Do the clusters group tasks by family or by language?")
    assert "ARI vs family" in ari_md and "ARI vs language" in ari_md
    family = np.array([FAMILIES.index(n.split("_")[0]) for n in res.names])
    for run in res.select("d2c", 2):  # one seed: the cell is the value itself
        want = adjusted_rand_score(family, np.array(run.partition))
        assert f"| D²C paper (P=1, M=1, local) | {want:.3f} |" in ari_md
    # The oracle "by family" partition is the family labelling itself.
    by_family = res.select("by_family")
    assert len(by_family) == 1 and report.ari(family, by_family[0].partition) == 1.0  # identical labels: exactly 1
    inv = _section(md, "## Investigation")
    assert "| Group by family (oracle) | 2 |" in inv and "| Group by language (oracle) | 3 |" in inv
    assert "| D²C paper setting, T = 6 | 2 |" in inv and "A longer search" in inv
    with open(written["json"], encoding="utf-8") as f:
        raw = json.load(f)
    assert {r["key"] for r in raw["runs"]} >= {"zero_shot", "single", "all_in_one", "random",
                                               "kmeans", "svd_kmeans", "d2c", "d2c_ours"}


def test_the_outcome_is_explained_from_the_numbers(tiny_report):
    res, _, md = tiny_report
    why = _section(md, "### What explains the outcome")
    d2c = res.select("d2c", 2)
    best = min((r for r in res.runs if r.merge == "ties" and r.num_clusters == 2 and r.partition is not None
                and r.search_loss is not None), key=lambda r: r.search_loss)
    assert f"search loss of {np.mean([r.search_loss for r in d2c]):.4f}" in why
    assert f"is {best.search_loss:.4f} ({best.key}" in why
    family = np.array([FAMILIES.index(n.split("_")[0]) for n in res.names])
    svd = res.select("svd_kmeans", 2)
    svd_ari = np.mean([adjusted_rand_score(family, r.partition) for r in svd])
    assert f"with ARI {svd_ari:.3f}" in why
    # Whether the weights alone found the families decides the sentence (threshold ARI 0.5).
    assert ("groups the tasks by family" if svd_ari >= 0.5 else "does not group the tasks by family") in why
    # The compared merge: the same partitions re-merged with linear, score change quoted.
    pairs = [(r.score, o.score) for r in res.runs if r.merge == "ties" and r.partition is not None
             and r.seed in (None, 0)
             for o in res.select(r.key, r.num_clusters, merge="linear") if o.partition == r.partition]
    assert len(pairs) >= 3
    diff = np.mean([b - a for a, b in pairs])
    assert f"merged with linear instead of ties score {diff:+.2f} points" in why


def test_bad_suite_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="not a suite directory"):
        report.resolve_suite(str(tmp_path), str(tmp_path))
    with pytest.raises(UserError, match="neither a suite directory nor a preset"):
        report.resolve_suite(str(tmp_path / "nope"), str(tmp_path))


def test_merging_section_has_operators_tuned_weights_budget_and_targets(tiny_report):
    res, _, md = tiny_report
    sec = _section(md, "## Beyond the paper")
    for op in OPERATORS:
        for weights in ("unit", "tuned"):
            assert f"| D²C ours | {op} | {weights} |" in sec and f"| Family oracle | {op} | {weights} |" in sec
    # tuned factors only for --factor_operators
    assert "| D²C ours | linear | tuned factors |" in sec and "| Family oracle | linear | tuned factors |" in sec
    assert "| D²C ours | ties | tuned factors |" not in sec
    assert "Budget mode" in sec and "K-means (SVD, cosine)" in sec
    for target in ("Gap target", "Budget target", "Clustering target"):
        assert target in sec
    # tuned rows: scored on the held-out split with the kept weights; the unit rows are the plain merges
    tuned = [r for r in res.runs if r.variant in ("tuned", "factors")]
    assert {"tuned", "factors"} <= {r.variant for r in tuned}
    # kept_k only where tuned < unit: each term <=, and a float sum is monotone in its terms
    assert all(r.extra["heldout_kept"] <= r.extra["heldout_unit"] for r in tuned)
    budget = [r for r in res.runs if r.key == "budget" and r.variant == "budget"]
    assert budget and {(w["num_clusters"], w["rank"]) for w in budget[0].extra["ways"]} == {(2, 4), (4, 2)}
    chosen = min(budget[0].extra["ways"], key=lambda w: w["search_loss"])
    assert (budget[0].num_clusters, budget[0].rank or 4) == (chosen["num_clusters"], chosen["rank"])


def test_controls_table_has_every_control_under_both_partitions_and_the_targets(tiny_report):
    res, _, md = tiny_report
    sec = _section(md, "## Beyond the paper")
    ctl = sec[sec.index("### Controls"):]
    for part in ("D²C paper (found with ties)", "D²C ours (found with ties)"):
        for method in ("ties, unit weights (the paper's merge)", "linear, unit weights",
                       "linear, one tuned scale per cluster", "fresh rank-4 LoRA per cluster, ≤ 2 steps |",
                       "fresh rank-4 LoRA per cluster, ≤ 3 steps (patience 3) |", "linear, tuned factors (≤ 2 steps)"):
            assert f"| {part} | {method}" in ctl, (part, method)
    for part in ("Random (Table 1's seeds)", "All-in-one (K = 1)"):
        for method in ("linear, unit weights", "linear, tuned factors (≤ 2 steps)"):
            assert f"| {part} | {method} |" in ctl, (part, method)
    for line in ("- Partition:", "- Operator", "- Tuning:", "- Target (the best method beats every control by ≥ 3",
                 "- The fresh LoRA with ≤ 2 steps kept", "- The fresh LoRA with ≤ 3 steps (patience 3) kept"):
        assert line in ctl, line
    # the fresh LoRA starts at the base model (B = 0), the scale control is one weight per cluster
    fresh = [r for r in res.runs if r.variant == "fresh_factors"]
    assert fresh and all(r.extra["start"] == "fresh" for r in fresh)
    assert {r.key for r in fresh} == {"d2c", "d2c_ours"}
    scale = [r for r in res.runs if r.variant == "scale_tuned"]
    assert scale and all(r.extra["granularity"] == "scale" and r.rank == 0 for r in scale)
    k1 = [r for r in res.runs if r.key == "all_in_one" and r.variant == "factors"]
    assert len(k1) == 1 and k1[0].num_clusters == 1 and set(k1[0].partition) == {0}


def test_controls_table_shows_task_arithmetics_exact_sum_at_its_rank(tiny_report):
    """With core_ta as the scale operator the report also tunes one scale on the exact sum (an
    output rank that truncates nothing; tune.py's test checks that merge against float64 numpy):
    its row names that rank and storage. Rendered from the tiny report's scale runs as core_ta runs."""
    from experiments.report.controls import render_controls

    res, _, _ = tiny_report
    ta = [dataclasses.replace(r, merge="core_ta") for r in res.runs if r.merge == "linear" and r.variant in
          ("", "scale_tuned") and r.key in ("d2c", "d2c_ours")]
    exact = [dataclasses.replace(r, variant="scale_tuned_exact", rank=16) for r in ta if r.variant]
    out = "\n".join(render_controls(dataclasses.replace(res, cfg=dataclasses.replace(res.cfg, scale_operator="core_ta"),
                                                         runs=res.runs + ta + exact), [0], 0.0, 100.0))
    for part in ("D²C paper (found with ties)", "D²C ours (found with ties)"):
        for method in ("core_ta (task arithmetic), unit weights", "core_ta (task arithmetic), one tuned scale per cluster",
                       "core_ta (task arithmetic) at rank 16 (the exact sum, 4× the storage), one tuned scale per cluster"):
            assert f"| {part} | {method} |" in out, (part, method)
