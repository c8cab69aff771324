#!/usr/bin/env bash
# Run one blip2-jax command as N cooperating processes on this machine (jax.distributed over
# 127.0.0.1, gloo collectives on CPU), each with D simulated CPU devices (-d 0: the default platform).
# A small rehearsal of a pod or cluster launch: same flags, same code path, no hardware.
#
#   launch/local.sh [--dry-run] [-n NUM_PROCESSES] [-d DEVICES_PER_PROCESS] [-p PORT] -- train --config ... --workdir ...
#
# Environment: LOG_DIR (default ./logs/local): one log per process, process_<i>.log;
#              BLIP2_JAX (default "python -m blip2_jax"): the command to run.
# Exits with the first non-zero exit status of any process (the others are stopped then).
set -euo pipefail

dry_run=0
num_processes=2
devices=4
port=12355
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    -n) num_processes="$2"; shift 2 ;;
    -d) devices="$2"; shift 2 ;;
    -p) port="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "local.sh: unknown option $1 (the blip2-jax arguments go after --)" >&2; exit 2 ;;
  esac
done
if [[ $# -eq 0 ]]; then
  echo "usage: launch/local.sh [--dry-run] [-n N] [-d D] [-p PORT] -- train --config FILE:PRESET --workdir DIR" >&2
  exit 2
fi
if ! [[ "$num_processes" =~ ^[1-9][0-9]*$ && "$devices" =~ ^[0-9]+$ && "$port" =~ ^[0-9]+$ ]]; then
  echo "local.sh: -n must be >= 1, -d and -p numbers (got -n $num_processes -d $devices -p $port)" >&2
  exit 2
fi
log_dir="${LOG_DIR:-./logs/local}"
read -r -a runner <<< "${BLIP2_JAX:-python -m blip2_jax}"

xla_flags="${XLA_FLAGS:-}"
platforms="${JAX_PLATFORMS:-}"
if [[ "$devices" -gt 0 ]]; then  # simulated devices exist on the CPU platform only
  xla_flags="$(sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g' <<< "$xla_flags")"
  xla_flags="$xla_flags --xla_force_host_platform_device_count=$devices"
  platforms=cpu
fi

pids=()
for ((i = 0; i < num_processes; i++)); do
  cmd=("${runner[@]}" "$@" "--coordinator_address=127.0.0.1:$port" "--num_processes=$num_processes"
       "--process_id=$i")
  if [[ "$dry_run" -eq 1 ]]; then
    printf '%q ' env "JAX_PLATFORMS=$platforms" "XLA_FLAGS=${xla_flags# }" "${cmd[@]}"
    echo "> $log_dir/process_$i.log 2>&1 &"
    continue
  fi
  mkdir -p "$log_dir"
  JAX_PLATFORMS="$platforms" XLA_FLAGS="${xla_flags# }" "${cmd[@]}" > "$log_dir/process_$i.log" 2>&1 &
  pids+=("$!")
done
[[ "$dry_run" -eq 1 ]] && exit 0

status=0
for ((i = 0; i < ${#pids[@]}; i++)); do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [[ "$rc" -ne 0 ]]; then
    echo "local.sh: process $i exited with $rc; see $log_dir/process_$i.log" >&2
    if [[ "$status" -eq 0 ]]; then
      status=$rc
      kill "${pids[@]}" 2>/dev/null || true
    fi
  fi
done
exit "$status"
