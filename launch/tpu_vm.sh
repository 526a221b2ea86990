#!/usr/bin/env bash
# Runs one command on every worker of a Cloud TPU VM (a pod slice is one process per host; JAX
# auto-detects the hosts, process ids and coordinator there, so the command is the same on all).
#
#   D2C_BUCKET=my-bucket launch/tpu_vm.sh NAME ZONE [--project=P] -- python launch/search.py \
#       --flagfile=configs/llama.flags          # --workdir=gs://my-bucket/d2c/NAME
#
# A search command without --workdir on its command line gets --workdir=gs://$D2C_BUCKET/d2c/NAME
# (the run's checkpoints and outputs in the bucket; no shared file system needed, only process 0
# writes there); an explicit --workdir (gs:// or a shared mount) is kept. The repository must be
# at the same path on every worker (REPO, default ~/d2c_jax; `setup` below copies it there and
# installs it with the gcs extra).
#   launch/tpu_vm.sh NAME ZONE setup        # scp this checkout to every worker, pip install -e '.[gcs]'
#   launch/tpu_vm.sh NAME ZONE -- CMD...    # run CMD in REPO on every worker (--worker=all)
# Re-running the same search command resumes from the latest checkpoint (e.g. after preemption).
set -euo pipefail

if [[ $# -lt 3 ]]; then
  sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
NAME=$1; ZONE=$2; shift 2
EXTRA=()
while [[ $# -gt 0 && $1 == --* && $1 != -- ]]; do EXTRA+=("$1"); shift; done
REPO=${REPO:-'~/d2c_jax'}
SSH=(gcloud compute tpus tpu-vm ssh "$NAME" --zone="$ZONE" --worker=all "${EXTRA[@]}")

if [[ $1 == setup ]]; then
  ROOT=$(cd "$(dirname "$0")/.." && pwd)
  tar -C "$ROOT" --exclude=.git --exclude=runs --exclude=.venv -czf /tmp/d2c_jax.tgz .
  gcloud compute tpus tpu-vm scp /tmp/d2c_jax.tgz "$NAME":/tmp/d2c_jax.tgz --zone="$ZONE" --worker=all "${EXTRA[@]}"
  "${SSH[@]}" --command="mkdir -p $REPO && tar -C $REPO -xzf /tmp/d2c_jax.tgz && cd $REPO && pip install -q -e '.[gcs]' 'jax[tpu]'"
  exit 0
fi
[[ $1 == -- ]] && shift
ARGS=("$@")
if [[ " $* " == *launch/search.py* ]] && ! printf '%s\n' "$@" | grep -q -e '^--workdir=' -e '^--workdir$'; then
  if [[ -z ${D2C_BUCKET:-} ]]; then
    echo "error: tpu_vm.sh: name the work directory: --workdir=gs://BUCKET/PATH in the command, or" \
         "D2C_BUCKET=BUCKET for gs://BUCKET/d2c/$NAME" >&2
    exit 2
  fi
  ARGS+=("--workdir=gs://$D2C_BUCKET/d2c/$NAME")
fi
set -- "${ARGS[@]}"
CMD=$(printf '%q ' "$@")
# --worker=all runs the command on every host at once; each prints its own output, prefixed by gcloud.
"${SSH[@]}" --command="cd $REPO && $CMD"
