#!/usr/bin/env bash
# Carries an unfinished run directory from one machine to the next (here a
# run directory does not outlive its session's machine). `pack` keeps what
# resuming and the final analyses need: the config, results CSVs, manifest,
# log and provenance, every dataset, and the checkpoints of the last stage
# (resuming starts there), of the last stage that passed its gate (the final
# analyses read it) and of the last supervised stage (supervised.from takes
# it over); the other checkpoints keep only their hashes in the manifest.
# `unpack` restores the directory under a runs directory, and `sector run`
# then resumes after its last finished stage.
#
# usage: scripts/carry-run.sh pack RUN_DIR BUNDLE.tar.xz
#        scripts/carry-run.sh unpack BUNDLE.tar.xz RUNS_DIR
set -euo pipefail

usage() {
  sed -n '12,13p' "$0" >&2
  exit 2
}

pack() {
  local run_dir=${1%/} bundle=$2
  if [[ ! -f $run_dir/stages.csv ]]; then
    echo "carry-run: $run_dir/stages.csv not found: the run has no finished stage to carry" >&2
    exit 1
  fi
  # The stages whose checkpoints are kept (columns found by name in the header).
  local keep
  keep=$(awk -F, 'NR == 1 { for (i = 1; i <= NF; i++) col[$i] = i; next }
    { last = $col["stage"] }
    $col["passed"] == "true" { passed = $col["stage"] }
    $col["phase"] == "supervised" { supervised = $col["stage"] }
    END { printf "stage-%02d stage-%02d stage-%02d", last, passed, supervised }' "$run_dir/stages.csv")
  local checkpoint excludes=()
  while IFS= read -r checkpoint; do
    if [[ " $keep " != *" $checkpoint "* ]]; then
      excludes+=("--exclude=$(basename "$run_dir")/checkpoints/$checkpoint")
    fi
  done < <(find "$run_dir/checkpoints" -mindepth 1 -maxdepth 1 -name 'stage-*' -printf '%f\n' | sort)
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
