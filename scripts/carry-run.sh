#!/usr/bin/env bash
# Carries an unfinished run directory from one machine to the next (here a
# run directory does not outlive its session's machine). `pack` keeps what
# resuming and the final analyses need: the config, results CSVs, manifest,
# log and provenance, every dataset, and the checkpoints of the last two
# stages and of the last supervised stage (supervised.from takes that one
# over); the other checkpoints keep only their hashes in the manifest.
# `unpack` restores the directory under a runs directory, and `sector run`
# then resumes after its last finished stage.
#
# usage: scripts/carry-run.sh pack RUN_DIR BUNDLE.tar.xz
#        scripts/carry-run.sh unpack BUNDLE.tar.xz RUNS_DIR
set -euo pipefail

usage() {
  sed -n '11,12p' "$0" >&2
  exit 2
}

pack() {
  local run_dir=${1%/} bundle=$2
  if [[ ! -f $run_dir/stages.csv ]]; then
    echo "carry-run: $run_dir/stages.csv not found: the run has no finished stage to carry" >&2
    exit 1
  fi
  # The stage of the last supervised row (columns found by name in the header).
  local last_supervised
  last_supervised=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    $col["phase"] == "supervised" { stage = $col["stage"] } END { print stage }' "$run_dir/stages.csv")
  local checkpoints excludes=()
  mapfile -t checkpoints < <(find "$run_dir/checkpoints" -mindepth 1 -maxdepth 1 -name 'stage-*' -printf '%f\n' | sort)
  local count=${#checkpoints[@]} i
  for ((i = 0; i < count - 2; i++)); do
    if [[ ${checkpoints[i]} != "$(printf 'stage-%02d' "$last_supervised")" ]]; then
      excludes+=("--exclude=$(basename "$run_dir")/checkpoints/${checkpoints[i]}")
    fi
  done
  tar -C "$(dirname "$run_dir")" --exclude="$(basename "$run_dir")/.lock" "${excludes[@]}" \
    -cJf "$bundle.partial" "$(basename "$run_dir")"
  mv "$bundle.partial" "$bundle"
  echo "carry-run: packed $run_dir into $bundle ($(du -h "$bundle" | cut -f1); ${#excludes[@]} checkpoints left out, their hashes kept)"
}

unpack() {
  local bundle=$1 runs_dir=$2 name
  name=$(tar -tJf "$bundle" | awk -F/ 'NR == 1 { print $1 }')
  if [[ -e $runs_dir/$name ]]; then
    echo "carry-run: $runs_dir/$name exists; move it away first (nothing was unpacked)" >&2
    exit 1
  fi
  mkdir -p "$runs_dir"
  tar -C "$runs_dir" -xJf "$bundle"
  echo "carry-run: unpacked $runs_dir/$name; \`sector run\` with --runs-dir $runs_dir resumes it"
}

case ${1:-} in
  pack) [[ $# -eq 3 ]] || usage; pack "$2" "$3" ;;
  unpack) [[ $# -eq 3 ]] || usage; unpack "$2" "$3" ;;
  *) usage ;;
esac
