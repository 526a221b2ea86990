"""launch/evaluate.py never writes over a user's file beside its --output: with a run or --compare
it also writes OUT.md (the tables) and OUT.png (the chart), and those paths are checked like the
output itself, before anything is computed. The property test of whole commands
(test_command_properties.py) found a user's OUT.md replaced and a link at OUT.png replaced.

In-process: `check_output` is what the script runs first (no model is loaded here).
"""

from __future__ import annotations

import importlib.util
import json
import os

import pytest

from d2c_jax import comparison, plots
from d2c_jax.errors import UserError
from d2c_jax.evaluation import EvalConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("evaluate_script", os.path.join(ROOT, "launch", "evaluate.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not __main__: defines no flags
    return module


def _cfg(tmp_path, **kw):
    return EvalConfig(base_model=str(tmp_path / "base"), adapters_dir=str(tmp_path / "adapters"),
                      data_dir=str(tmp_path / "data"), output=str(tmp_path / "ev.json"), **kw)


def _refused(script, cfg):
    with pytest.raises(UserError) as e:
        script.check_output(cfg)
    return str(e.value)


def test_a_users_table_or_link_beside_the_output_is_refused(script, tmp_path):
    (tmp_path / "ev.md").write_text("# my notes\n")
    cfg = _cfg(tmp_path, compare=("zero_shot",))
    assert _refused(script, cfg) == (
        f"{tmp_path}/ev.md: --output exists and is not a d2c_jax evaluation table or chart; refusing to overwrite it "
        "— choose another --output or remove it yourself")
    os.remove(tmp_path / "ev.md")
    (tmp_path / "precious.png").write_bytes(b"keep")
    os.symlink(tmp_path / "precious.png", tmp_path / "ev.png")
    assert _refused(script, cfg) == (f"{tmp_path}/ev.png: --output is a symbolic link; refusing to write through it "
                                     "— choose another --output")
    assert (tmp_path / "precious.png").read_bytes() == b"keep" and os.path.islink(tmp_path / "ev.png")
    assert sorted(os.listdir(tmp_path)) == ["ev.png", "precious.png"]


def test_without_charts_a_users_table_beside_the_output_is_not_in_the_way(script, tmp_path):
    (tmp_path / "ev.md").write_text("# my notes\n")
    script.check_output(_cfg(tmp_path))  # each adapter alone, no comparison: only ev.json is written
    assert (tmp_path / "ev.md").read_text() == "# my notes\n"


def test_our_table_and_chart_are_replaced_even_without_the_evaluation_beside_them(script, tmp_path):
    """A run killed after writing the table and chart, before the JSON (written last)."""
    (tmp_path / "ev.md").write_text(f"# {comparison.EVALUATION_TITLE} runs/demo\n\n...")
    fig = plots.pyplot().figure()
    (tmp_path / "ev.png").write_bytes(plots.png(fig))
    script.check_output(_cfg(tmp_path, compare=("zero_shot",)))


def test_a_users_png_is_not_taken_for_ours(tmp_path):
    plt = plots.pyplot()
    fig = plt.figure()
    fig.savefig(tmp_path / "mine.png")  # matplotlib's own Software text, not ours
    plt.close(fig)
    (tmp_path / "ours.png").write_bytes(plots.png(plt.figure()))
    assert not plots.is_our_png(str(tmp_path / "mine.png"))
    assert plots.is_our_png(str(tmp_path / "ours.png"))
    assert not plots.is_our_png(str(tmp_path / "absent.png"))


def test_an_earlier_evaluation_makes_its_table_and_chart_ours(script, tmp_path):
    (tmp_path / "ev.json").write_text(json.dumps({"tasks": {}, "summary": {}}))
    (tmp_path / "ev.md").write_text("edited by hand\n")  # an earlier output of ours, edited: still replaced
    script.check_output(_cfg(tmp_path, compare=("zero_shot",)))


@pytest.mark.parametrize("evaluation_is_ours", [True, False])
def test_search_overwrite_removes_the_runs_own_evaluation_and_nothing_of_the_users(tmp_path, evaluation_is_ours):
    """`search.py --overwrite` on a finished run removes its outputs; the evaluation launch/evaluate.py
    wrote beside them (of the partition being removed) goes too, never a user's file of that name."""
    from d2c_jax import pipeline

    wd = tmp_path / "run"
    wd.mkdir()
    (wd / "partition.json").write_text("{}")
    (wd / "evaluation.json").write_text(json.dumps({"tasks": {}, "summary": {}}) if evaluation_is_ours
                                        else json.dumps({"my": "numbers"}))
    (wd / "evaluation.md").write_text("# my notes\n")  # not our table: ours only beside our evaluation
    (wd / "evaluation.png").write_bytes(plots.png(plots.pyplot().figure()))
    (wd / "notes.txt").write_text("keep")
    lock = pipeline.prepare_workdir(str(wd), overwrite=True, is_main=True)
    lock.release()
    left = sorted(n for n in os.listdir(wd) if not n.startswith("."))
    if evaluation_is_ours:
        assert left == ["notes.txt"]
    else:  # the user's evaluation.json and table stay; our chart (its own content says so) goes
        assert left == ["evaluation.json", "evaluation.md", "notes.txt"]
        assert json.loads((wd / "evaluation.json").read_text()) == {"my": "numbers"}
