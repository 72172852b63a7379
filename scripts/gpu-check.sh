#!/usr/bin/env bash
# The paper-scale path on one GPU, made to take at most 10 minutes (never
# timed: the machine sector is developed on has no GPU; tests/gpu_check.rs
# runs it with --device cpu). REPRODUCE.md, "Paper scale on GPUs".
#   1. builds sector with --features cuda;
#   2. runs the golden tests on the GPU (SECTOR_TEST_DEVICE): logits in bf16
#      against transformers' f32 within the bf16 tolerance of tests/common;
#   3. trains byt5-small from seeded random weights for 20 steps in bf16 at
#      about one micro-batch of the paper config (sector smoke), sampling the
#      GPU's memory with nvidia-smi;
#   4. writes OUT/report.md: tokens a second, peak GPU memory beside the
#      memory plan, and `sector cost`'s hours for the paper run beside the
#      hours at the measured rate.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: scripts/gpu-check.sh [--device cuda|cuda:N|cpu] [--preset NAME] [--steps N]
                            [--batch N] [--out DIR] [--no-build] [--no-golden]
  --device     where to train (default cuda; cpu runs the same steps on the CPU)
  --preset     model preset (default byt5-small)
  --steps      optimiser steps (default 20)
  --batch      examples a step (default 256: about one 12,288-token micro-batch
               of experiments/paper/main.toml)
  --out        report directory (default runs/gpu-check)
  --no-build   use the sector binary at $SECTOR (default target/release/sector)
  --no-golden  skip the golden tests
EOF
}

device=cuda preset=byt5-small steps=20 batch=256 out=runs/gpu-check build=1 golden=1
while [ $# -gt 0 ]; do
    case "$1" in
        --device | --preset | --steps | --batch | --out)
            if [ $# -lt 2 ]; then
                echo "gpu-check: $1 needs a value" >&2
                usage >&2
                exit 2
            fi
            case "$1" in
                --device) device=$2 ;;
                --preset) preset=$2 ;;
                --steps) steps=$2 ;;
                --batch) batch=$2 ;;
                --out) out=$2 ;;
            esac
            shift 2
            ;;
        --no-build) build=0 && shift ;;
        --no-golden) golden=0 && shift ;;
        -h | --help) usage && exit 0 ;;
        *)
            echo "gpu-check: unknown argument $1" >&2
            usage >&2
            exit 2
            ;;
    esac
done
for number in "$steps" "$batch"; do
    if ! [[ $number =~ ^[1-9][0-9]*$ ]]; then
        echo "gpu-check: --steps and --batch take a positive whole number, not '$number'" >&2
        exit 2
    fi
done
case "$device" in
    cpu) features="" gpu="" ;;
    cuda) features="--features cuda" gpu=0 ;;
    cuda:[0-9]*) features="--features cuda" gpu=${device#cuda:} ;;
    *)
        echo "gpu-check: --device is cpu, cuda or cuda:N, not '$device'" >&2
        exit 2
        ;;
esac

root=$(cd "$(dirname "$0")/.." && pwd)
sector=${SECTOR:-$root/target/release/sector}
config=$root/experiments/paper/main.toml
mkdir -p "$out"
log="$out/gpu-check.log"
: >"$log"
say() { echo "gpu-check: $*" | tee -a "$log" >&2; }

if [ "$build" = 1 ]; then
    say "building (cargo build --release $features)"
    # shellcheck disable=SC2086 # $features is empty or two words
    cargo build --release --manifest-path "$root/Cargo.toml" $features >>"$log" 2>&1
fi
golden_result="skipped (--no-golden)"
if [ "$golden" = 1 ]; then
    say "golden tests on $device"
    # shellcheck disable=SC2086
    if SECTOR_TEST_DEVICE=$device cargo test --release --manifest-path "$root/Cargo.toml" $features \
        --test golden >>"$log" 2>&1; then
        golden_result="passed"
    else
        golden_result="FAILED (see gpu-check.log)"
    fi
fi

sampler=""
memory_csv="$out/gpu-memory.csv"
if [ -n "$gpu" ]; then
    nvidia-smi --query-gpu=memory.used,memory.total --format=csv,noheader,nounits -i "$gpu" -lms 500 >"$memory_csv" &
    sampler=$!
fi
say "training $preset for $steps steps of $batch examples on $device"
smoke_ok=1
"$sector" smoke "$config" --preset "$preset" --steps "$steps" --batch "$batch" \
    --device "$device" --out "$out/checkpoint" >"$out/smoke.md" 2>>"$log" || smoke_ok=0
if [ -n "$sampler" ]; then
    kill "$sampler" 2>/dev/null || true
    wait "$sampler" 2>/dev/null || true
    memory=$(awk -F', *' '$1 > peak { peak = $1; total = $2 } END { if (total) printf "%d MiB of %d MiB", peak, total }' "$memory_csv")
else
    memory="not measured (no GPU: --device $device)"
fi
"$sector" cost "$config" >"$out/cost.md"

# The measured rate (the smoke table's training TFLOP/s) and the training
# PFLOP of one epoch of every stage of paper-main (the cost table's).
rate=$(awk -F'|' -v p="$preset" '$2 ~ " " p " " { gsub(/ /, "", $8); print $8 }' "$out/smoke.md")
flops=$(awk -F'|' '$2 ~ "paper-main" { gsub(/ /, "", $6); print $6 }' "$out/cost.md")
hours=$(awk -v r="${rate:-0}" -v f="${flops:-0}" \
    'BEGIN { if (r > 0) printf "%.1f", f * 1e15 / (r * 1e12) / 3600 / 8; else print "-" }')

{
    echo "# sector GPU check"
    echo
    echo "- commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%Y-%m-%dT%H:%MZ)"
    if [ -n "$gpu" ]; then
        echo "- GPU $gpu: $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader -i "$gpu")"
    else
        echo "- device: $device (no GPU)"
    fi
    echo "- golden tests on $device: $golden_result"
    echo "- training: $([ "$smoke_ok" = 1 ] && echo "passed" || echo "FAILED (see gpu-check.log)")"
    echo "- peak GPU memory (nvidia-smi, every 0.5 s): $memory; the memory plan is in the table"
    echo "- the training data of paper-main, one epoch a stage, at the measured ${rate:-?} TFLOP/s a GPU on 8 GPUs: $hours hours of training (the cost table below assumes 30 % of each GPU's peak)"
    echo
    echo "## $preset, $steps steps of $batch examples"
    echo
    cat "$out/smoke.md"
    echo
    echo "## sector cost experiments/paper/main.toml"
    echo
    cat "$out/cost.md"
} >"$out/report.md"
say "report: $out/report.md"
[ "$smoke_ok" = 1 ] && [ "$golden_result" != "FAILED (see gpu-check.log)" ]
