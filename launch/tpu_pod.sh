#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: create it (or reuse it), install this project on every
# worker, run the same `blip2-jax train` on all workers with their logs streamed here, and after a
# preemption recreate the slice and run again; the run resumes from its last checkpoint in WORKDIR
# (which must be on GCS, e.g. gs://bucket/runs/s1, so it outlives the VMs).
#
#   TPU_NAME=blip2 ZONE=us-central2-b ACCELERATOR_TYPE=v4-32 \
#     launch/tpu_pod.sh [--dry-run] -- --config configs/stage1.py:vit_g --workdir gs://bucket/runs/s1
#
# Required: TPU_NAME, ZONE. Optional: PROJECT (gcloud's default), ACCELERATOR_TYPE (v4-32),
# RUNTIME_VERSION (tpu-ubuntu2204-base), SPOT=1 (spot capacity), REPO_URL and REPO_REF (default:
# this checkout's origin and commit), MAX_RESTARTS (10), LOG_DIR (./logs/tpu_pod).
# --dry-run prints every gcloud command instead of running it (and assumes the slice is absent).
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ "${1:-}" == "--" ]]; then shift; fi
if [[ $# -eq 0 ]]; then
  echo "usage: TPU_NAME=... ZONE=... launch/tpu_pod.sh [--dry-run] -- --config FILE:PRESET --workdir gs://..." >&2
  exit 2
fi
: "${TPU_NAME:?set TPU_NAME, the pod slice to create or reuse}"
: "${ZONE:?set ZONE, e.g. us-central2-b}"
accelerator="${ACCELERATOR_TYPE:-v4-32}"
runtime="${RUNTIME_VERSION:-tpu-ubuntu2204-base}"
max_restarts="${MAX_RESTARTS:-10}"
log_dir="${LOG_DIR:-./logs/tpu_pod}"
repo_dir="$(cd "$(dirname "$0")/.." && pwd)"
repo_url="${REPO_URL:-$(git -C "$repo_dir" remote get-url origin 2>/dev/null || echo "")}"
repo_ref="${REPO_REF:-$(git -C "$repo_dir" rev-parse HEAD 2>/dev/null || echo main)}"
if [[ -z "$repo_url" ]]; then
  echo "tpu_pod.sh: set REPO_URL (this checkout has no origin remote to clone on the workers)" >&2
  exit 2
fi
workdir=""
for ((i = 1; i <= $#; i++)); do
  if [[ "${!i}" == "--workdir" ]]; then j=$((i + 1)); workdir="${!j:-}"; fi
  if [[ "${!i}" == --workdir=* ]]; then workdir="${!i#--workdir=}"; fi
done
if [[ "$workdir" != gs://* ]]; then
  echo "tpu_pod.sh: --workdir must be on GCS (gs://...) so checkpoints survive preemption; got '$workdir'" >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE")
if [[ -n "${PROJECT:-}" ]]; then where+=(--project="$PROJECT"); fi

run() {  # a command, or with --dry-run its text (shell-quoted: it can be pasted back)
  if [[ "$dry_run" -eq 1 ]]; then printf '%q ' "$@"; echo; else "$@"; fi
}

state() {
  if [[ "$dry_run" -eq 1 ]]; then echo "ABSENT"; return; fi
  "${gcloud_tpu[@]}" describe "$TPU_NAME" "${where[@]}" --format='value(state)' 2>/dev/null || echo "ABSENT"
}

create() {
  local spot=()
  if [[ "${SPOT:-0}" == "1" ]]; then spot=(--spot); fi
  run "${gcloud_tpu[@]}" create "$TPU_NAME" "${where[@]}" --accelerator-type="$accelerator" \
    --version="$runtime" "${spot[@]}"
}

on_all_workers() {
  run "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --worker=all --command="$1"
}

install() {
  on_all_workers "set -e; [ -d ~/blip2_jax ] || git clone -q $repo_url ~/blip2_jax; cd ~/blip2_jax; git fetch -q origin; git checkout -q $repo_ref; [ -d ~/blip2_jax_venv ] || python3 -m venv ~/blip2_jax_venv; ~/blip2_jax_venv/bin/pip install -q -e '.[tpu]'"
}

train_args="$(printf '%q ' "$@")"
log_file=/dev/null  # a dry run writes nothing
if [[ "$dry_run" -eq 0 ]]; then
  mkdir -p "$log_dir"
  log_file="$log_dir/train.log"
fi
for ((attempt = 0; attempt <= max_restarts; attempt++)); do
  case "$(state)" in
    READY) ;;
    ABSENT) create ;;
    PREEMPTED | TERMINATED | SUSPENDED)
      run "${gcloud_tpu[@]}" delete "$TPU_NAME" "${where[@]}" --quiet
      create ;;
    *) echo "tpu_pod.sh: $TPU_NAME is in state $(state); waiting" >&2; sleep 60; continue ;;
  esac
  install
  # The same command on every worker; JAX finds the other workers itself (no coordinator flags).
  if on_all_workers "cd ~/blip2_jax && ~/blip2_jax_venv/bin/blip2-jax train $train_args" 2>&1 \
      | tee -a "$log_file"; then
    exit 0
  fi
  if [[ "$(state)" == "READY" ]]; then
    echo "tpu_pod.sh: training failed on a healthy slice (not a preemption); see $log_file" >&2
    exit 1
  fi
  echo "tpu_pod.sh: $TPU_NAME was preempted; recreating it and resuming from $workdir" >&2
done
echo "tpu_pod.sh: gave up after $max_restarts restarts" >&2
exit 1
