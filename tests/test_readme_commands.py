"""Every command a user types in README.md runs: the fenced bash blocks (and the flagfile edit and
the PEFT snippet) are extracted from the README itself and executed in a scratch directory on the
tiny search fixture instead of the demo suite or a 3B model (the paths swapped, the run made
short with a few flags appended); the install lines are checked against pyproject.toml's extras.
A command the README gains without a rule here fails the test, so the README cannot drift from
what runs."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
import tomllib

import pytest

from fixtures_search_inputs import child_env, make_search_inputs

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
BASE = "/models/Llama-3.2-3B-Instruct"  # the README's base model path
# Appended to the README's commands: the fixture instead of the demo suite / the paper's model,
# and a short run.
FIXTURE_RUN = ["--iterations=6", "--examples_per_task=3", "--noprogress"]
SHORT = {
    "search.py --flagfile=configs/demo.flags": ["--num_clusters=2", *FIXTURE_RUN],  # + the fixture's paths
    "search.py --flagfile=my.flags": ["--nochat_template", "--dtype=float32", "--max_seq_len=64", *FIXTURE_RUN],
    "evaluate.py": ["--metrics=loss", "--noprogress"],
}
# Inline commands the README names as the source of a figure or for the test suite: not run here.
NOT_RUN = {
    "python launch/report.py --suite=full --seeds=3": "16 minutes; its output is docs/results.md",
    "python -m pytest -q -n 2": "the whole test suite",
}


def _blocks(text: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.M | re.S)


def _commands(block: str) -> list[str]:
    """The block's commands: continuation lines joined, comments dropped, `a && b` split."""
    joined = re.sub(r"\\\n\s*", " ", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        out += [c.strip() for c in line.split(" && ") if c.strip()]
    return out


def _inline_commands(text: str) -> list[str]:
    return [c for c in re.findall(r"`([^`\n]+)`", text) if c.startswith(("python ", "pip "))]


def _extras() -> set[str]:
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return set(tomllib.load(f)["project"]["optional-dependencies"])


def _check_install(cmd: str) -> None:
    m = re.fullmatch(r"pip install -e (?:\.|'\.\[([\w,]+)\]')", cmd)
    assert m, f"unexpected install line: {cmd}"
    assert set((m.group(1) or "").split(",")) - {""} <= _extras(), cmd


@pytest.fixture(scope="module")
def readme():
    with open(README, encoding="utf-8") as f:
        return f.read()


def test_install_lines_name_existing_extras(readme):
    lines = [c for lang, b in _blocks(readme) if lang == "bash" for c in _commands(b) if c.startswith("pip ")]
    lines += [c for c in _inline_commands(readme) if c.startswith("pip ")]
    assert {"pip install -e .", "pip install -e '.[cuda]'", "pip install -e '.[tpu]'"} <= set(lines)
    for cmd in lines:
        _check_install(cmd)


def test_every_readme_command_runs_on_the_tiny_fixture(readme, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    for name in ("launch", "configs", "experiments"):
        os.symlink(os.path.join(REPO, name), work / name)
    fx = make_search_inputs(tmp_path / "fx", tags=True)
    (work / "my_tasks").mkdir()
    os.symlink(fx["adapters_dir"], work / "my_tasks" / "adapters")
    os.symlink(fx["data_dir"], work / "my_tasks" / "data")
    env = child_env(PYTHONPATH=REPO)

    def run(argv):
        start = time.perf_counter()
        proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(argv)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        print(f"{time.perf_counter() - start:6.1f} s  {shlex.join(argv[1:])[:100]}")  # pytest -s: the costs
        return proc

    blocks = _blocks(readme)
    edit = next(b for lang, b in blocks if lang == "" and b.startswith("--base_model="))
    ran = []
    for lang, block in blocks:
        if lang == "python":  # the PEFT snippet, on the fixture's base model and run
            code = block.replace(BASE, fx["base_model"]).replace('"summarise_en"', '"task_4"')
            proc = run([sys.executable, "-c", code + "\nprint(type(model).__name__, k)\n"])
            assert proc.stdout.split()[0].startswith("Peft"), proc.stdout
            ran.append("python snippet")
            continue
        if lang != "bash":
            continue
        for cmd in _commands(block):
            if cmd.startswith("pip "):
                _check_install(cmd)
                continue
            if cmd.startswith(("python3 -m venv", ". .venv/bin/activate")):
                continue  # the environment the test already runs in
            if cmd in NOT_RUN:
                continue
            argv = shlex.split(cmd)
            if argv[0] == "cp":
                run(argv)
                if argv[-1] == "my.flags":  # the README's edit of its /path/to/ lines
                    lines = (work / "my.flags").read_text().splitlines()
                    new = dict(line.split("=", 1) for line in edit.replace(BASE, fx["base_model"]).split())
                    lines = [f"{line.split('=', 1)[0]}={new[line.split('=', 1)[0]]}"
                             if line.split("=", 1)[0] in new else line for line in lines]
                    (work / "my.flags").write_text("\n".join(lines) + "\n")
                ran.append(cmd)
                continue
            assert argv[0] == "python", f"no rule for README command: {cmd}"
            script = " ".join([os.path.basename(argv[1]), *argv[2:3]])
            extra = next((v for k, v in SHORT.items() if script.startswith(k)), [])
            if "demo.flags" in cmd:
                extra = ["--suite="] + [f"--{k}={v}" for k, v in fx.items()] + extra  # the fixture instead
            proc = run([sys.executable, *argv[1:], *extra])
            ran.append(cmd)
            if argv[1] == "launch/search.py" and "--show" not in cmd:
                assert "found " in proc.stdout and "outputs in " in proc.stdout
            if argv[1] == "launch/evaluate.py":
                assert "overall (5 tasks)" in proc.stdout and "all-in-one" in proc.stdout
    assert "python launch/search.py --flagfile=configs/demo.flags" in ran
    assert "python launch/evaluate.py --workdir=runs/mine" in ran and "python snippet" in ran
    assert (work / "runs" / "mine" / "merged" / "cluster_2" / "adapter_config.json").exists()

    for cmd in _inline_commands(readme):
        if cmd.startswith("pip ") or cmd in NOT_RUN:
            continue
        assert cmd == "python experiments/memory_report.py", f"no rule for README command: {cmd}"
        proc = run([sys.executable, *shlex.split(cmd)[1:]])
        assert re.search(r"^\s+1\s+5\.98\s+5\.47\s+11\.45$", proc.stdout, re.M), proc.stdout  # the README's row
