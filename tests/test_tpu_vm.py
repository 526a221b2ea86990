"""launch/tpu_vm.sh hands the command to `gcloud compute tpus tpu-vm ssh --worker=all` (a fake
gcloud on PATH records its arguments; no cloud needed)."""

from __future__ import annotations

import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "launch", "tpu_vm.sh")


def _run(tmp_path, *args, **env_vars):
    fake = tmp_path / "bin"
    fake.mkdir(exist_ok=True)
    log = tmp_path / "gcloud.log"
    (fake / "gcloud").write_text(f'#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done >> {log}\necho END >> {log}\n')
    (fake / "gcloud").chmod(0o755)
    env = {**{k: v for k, v in os.environ.items() if k != "D2C_BUCKET"}, "PATH": f"{fake}:{os.environ['PATH']}",
           **env_vars}
    proc = subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, env=env, timeout=60)
    return proc, (log.read_text().split("END\n")[:-1] if log.exists() else [])


def test_runs_the_command_on_every_worker(tmp_path):
    proc, calls = _run(tmp_path, "my-tpu", "us-central2-b", "--project=p1", "--", "python", "launch/search.py",
                       "--workdir=/mnt/shared/run 1", "--iterations=200")
    assert proc.returncode == 0, proc.stderr
    (call,) = calls
    argv = call.splitlines()
    assert argv[:5] == ["compute", "tpus", "tpu-vm", "ssh", "my-tpu"]
    assert "--worker=all" in argv and "--zone=us-central2-b" in argv and "--project=p1" in argv
    command = next(a for a in argv if a.startswith("--command="))
    assert command.startswith("--command=cd ~/d2c_jax && python launch/search.py")
    assert "--workdir=/mnt/shared/run\\ 1" in command  # quoted for the remote shell


def test_usage_without_arguments(tmp_path):
    proc, calls = _run(tmp_path)
    assert proc.returncode == 2 and "tpu_vm.sh NAME ZONE" in proc.stdout
    assert calls == []


def test_a_search_without_workdir_gets_a_gs_workdir_in_the_bucket(tmp_path):
    proc, calls = _run(tmp_path, "my-tpu", "us-central2-b", "--", "python", "launch/search.py",
                       "--flagfile=configs/llama.flags", D2C_BUCKET="my-bucket")
    assert proc.returncode == 0, proc.stderr
    (command,) = [a for a in calls[0].splitlines() if a.startswith("--command=")]
    assert command.endswith("--flagfile=configs/llama.flags --workdir=gs://my-bucket/d2c/my-tpu ")


def test_an_explicit_workdir_is_kept_and_other_commands_get_none(tmp_path):
    for argv in (["python", "launch/search.py", "--workdir=gs://b2/run"], ["python", "launch/evaluate.py", "--x=1"]):
        proc, calls = _run(tmp_path, "my-tpu", "z", "--", *argv, D2C_BUCKET="my-bucket")
        assert proc.returncode == 0, proc.stderr
        command = [a for a in calls[-1].splitlines() if a.startswith("--command=")][0]
        assert "gs://my-bucket" not in command and command.endswith(" ".join(argv[1:]) + " ")


def test_a_search_without_workdir_or_bucket_is_refused_before_ssh(tmp_path):
    proc, calls = _run(tmp_path, "my-tpu", "z", "--", "python", "launch/search.py", "--flagfile=configs/llama.flags")
    assert proc.returncode == 2 and calls == []
    assert proc.stderr.strip() == ("error: tpu_vm.sh: name the work directory: --workdir=gs://BUCKET/PATH in the "
                                   "command, or D2C_BUCKET=BUCKET for gs://BUCKET/d2c/my-tpu")
