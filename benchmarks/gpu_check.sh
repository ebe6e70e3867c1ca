#!/usr/bin/env bash
# The GPU check: configs/mini.py, configs/v3_mini.py and a LoRA step of configs/deepseek_llm_7b.py
# in bfloat16 on one NVIDIA GPU, each in its own process (benchmarks/gpu_check.py), then one
# table, then V3 decoding against transformers. docs/gpu.md explains the columns.
set -u

usage() {
    cat <<'EOF'
usage: bash benchmarks/gpu_check.sh [--steps N] [--out FILE] [--hlo_dir DIR] [--dry_run]
                                    [--config.GROUP.FIELD=VALUE ...]

On a machine with an NVIDIA GPU: installs the `cuda` extra if JAX finds no GPU
(pip install -e ".[cuda]"), then for configs/mini.py and configs/v3_mini.py in bfloat16
(parameters stay float32), and a LoRA step of deepseek-llm-7b's shape (configs/deepseek_llm_7b.py,
random weights and tokens, rank 16 on every linear layer, batch 8 x 2048, remat and microbatches
from the memory plan), prints compile time, step time, tokens/s, MFU against the data-sheet
peak, peak device memory, the memory plan's total, and whether cuDNN attention and ragged_dot
were used by the compiled train step. Then configs/v3_tiny.py decodes greedily here and in
transformers (benchmarks/decode.py --vs_hf), if HF_PYTHON (default: PYTHON) has torch and
transformers. About 6-10 minutes on one H100/H200 (plus the install, if needed).

  --steps N       timed steps per round, 3 rounds after 2 warm-ups (default 20)
  --out FILE      also write the table's rows as JSON to FILE (default: stdout only)
  --hlo_dir DIR   also keep each step's lowered and compiled HLO text in DIR/CONFIG/
  --dry_run       print the commands, run nothing
  --config.*      passed on to the three training runs, after the defaults, so they win, e.g.
                  --config.train.batch_size=16 (defaults: --config.compute.dtype=bfloat16
                  --config.devices.num_gpus=1: the GPU with the most free memory)
  -h, --help      this message

Exit status: 0 all measured, 1 a run failed (its row says why), 2 no NVIDIA GPU found.
Environment: PYTHON (default: python), HF_PYTHON (the decode comparison's transformers side,
default: PYTHON), GPU_CHECK_TIMEOUT (seconds per run, default 240; twice that for the 7B).
EOF
}

die() { echo "gpu_check: $*" >&2; exit 1; }

steps=20
out=""
hlo_dir=""
dry_run=0
overrides=()
while [ $# -gt 0 ]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --dry_run|--dry-run) dry_run=1 ;;
        --steps=*) steps="${1#*=}" ;;
        --steps) [ $# -ge 2 ] || die "--steps needs a number"; steps="$2"; shift ;;
        --out=*) out="${1#*=}" ;;
        --out) [ $# -ge 2 ] || die "--out needs a file name"; out="$2"; shift ;;
        --hlo_dir=*) hlo_dir="${1#*=}" ;;
        --hlo_dir) [ $# -ge 2 ] || die "--hlo_dir needs a directory"; hlo_dir="$2"; shift ;;
        --config.*=*) overrides+=("$1") ;;
        --config.*)  # --config.GROUP.FIELD VALUE
            [ $# -ge 2 ] && [ "${2#--}" = "$2" ] || die "$1 needs a value: $1=VALUE"
            overrides+=("$1=$2"); shift ;;
        --config|--config=*)
            die "the configs are fixed (mini, v3_mini, deepseek_llm_7b); override fields with" \
                "--config.GROUP.FIELD=VALUE" ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
    shift
done
case "$steps" in
    ''|*[!0-9]*|0) die "--steps must be a positive whole number, got '$steps'" ;;
esac

python="${PYTHON:-python}"
timeout_s="${GPU_CHECK_TIMEOUT:-240}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(dirname "$here")"
case "$out" in ''|/*) ;; *) out="$PWD/$out" ;; esac  # relative to where it was called from
case "$hlo_dir" in ''|/*) ;; *) hlo_dir="$PWD/$hlo_dir" ;; esac
rows_dir="${TMPDIR:-/tmp}/gpu_check.$$"
hf_python="${HF_PYTHON:-$python}"
configs=(mini v3_mini deepseek_llm_7b)
has_gpu=("$python" -c 'import jax; jax.devices("gpu")')
has_hf=("$hf_python" -c 'import torch, transformers')
install=("$python" -m pip install -e ".[cuda]")
decode=("$python" benchmarks/decode.py --vs_hf --hf_python "$hf_python" --config configs/v3_tiny.py)

quoted() {  # the words as a shell reads them back: plain, or in single quotes
    local word line=""
    for word in "$@"; do
        case "$word" in
            *[!A-Za-z0-9_./=:,+@%-]*|'') word="'${word//\'/\'\\\'\'}'" ;;
        esac
        line="${line:+$line }$word"
    done
    printf '%s' "$line"
}
config_defaults() {  # what config $1 runs with besides bfloat16 on one GPU, one per line
    case "$1" in
        deepseek_llm_7b)  # a LoRA step of the 7B: the memory plan picks remat and microbatches
            printf '%s\n' --config.lora.rank=16 '--config.lora.targets=("all-linear",)' \
                --config.compute.remat=auto --config.train.grad_accum_steps=0 \
                --config.train.batch_size=8 --config.model.max_seq_len=2048 \
                --config.data.source=random ;;
    esac
}
time_limit() {  # seconds config $1 may run: the 7B's steps take about a second each
    case "$1" in deepseek_llm_7b) echo $((timeout_s * 2)) ;; *) echo "$timeout_s" ;; esac
}
measure_command() {  # the measuring run of config $1
    local defaults
    as_array defaults < <(config_defaults "$1")
    local command=("$python" benchmarks/gpu_check.py --config "configs/$1.py"
                   --config.compute.dtype=bfloat16 --config.devices.num_gpus=1
                   "${defaults[@]+"${defaults[@]}"}"
                   "${overrides[@]+"${overrides[@]}"}" --steps "$steps"
                   --row_out "$rows_dir/$1.json")
    [ -n "$hlo_dir" ] && command+=(--hlo_dir "$hlo_dir/$1")
    printf '%s\n' "${command[@]}"
}
report_command() {
    local rows=()
    for config in "${configs[@]}"; do rows+=("$rows_dir/$config.json"); done
    local command=("$python" benchmarks/gpu_check.py --rows "$(IFS=,; echo "${rows[*]}")")
    [ -n "$out" ] && command+=(--out "$out")
    printf '%s\n' "${command[@]}"
}
as_array() { mapfile -t "$1"; }

all_commands() {  # one per line, as they would run from the repository root
    echo "cd $(quoted "$repo")"
    echo "$(quoted "${has_gpu[@]}") 2>/dev/null || $(quoted "${install[@]}")"
    for config in "${configs[@]}"; do
        as_array command < <(measure_command "$config")
        echo "timeout $(time_limit "$config") $(quoted "${command[@]}")"
    done
    as_array command < <(report_command)
    quoted "${command[@]}"; echo
    echo "$(quoted "${has_hf[@]}") && timeout $timeout_s $(quoted "${decode[@]}")"
}

if [ "$dry_run" = 1 ]; then
    all_commands
    exit 0
fi

# No NVIDIA GPU: say so in one line, with what would have run, and stop.
reason=""
platforms="${JAX_PLATFORMS:-}"
if [ -n "$platforms" ] && ! echo "$platforms" | grep -qiE 'cuda|gpu'; then
    reason="JAX_PLATFORMS=$platforms keeps JAX off the GPUs"
elif ! command -v nvidia-smi >/dev/null 2>&1; then
    reason="nvidia-smi is not installed"
elif ! nvidia-smi -L 2>/dev/null | grep -q '^GPU'; then
    reason="nvidia-smi lists no GPU"
fi
if [ -n "$reason" ]; then
    as_array lines < <(all_commands)
    joined="$(printf '%s; ' "${lines[@]}")"
    echo "gpu_check: no NVIDIA GPU found ($reason); it would have run configs/mini.py," \
         "configs/v3_mini.py and a LoRA step of configs/deepseek_llm_7b.py in bfloat16," \
         "$steps steps x 3 rounds each, then V3 decoding against transformers, as:" \
         "${joined%; }" >&2
    exit 2
fi

cd "$repo" || die "cannot enter $repo"
if ! "${has_gpu[@]}" >/dev/null 2>&1; then
    echo "gpu_check: JAX finds no GPU; installing the cuda extra: $(quoted "${install[@]}")"
    "${install[@]}" || die "pip install -e \".[cuda]\" failed (see above)"
    "${has_gpu[@]}" >/dev/null 2>&1 || die "JAX still finds no GPU after installing the cuda" \
        "extra; check the driver with nvidia-smi and: $(quoted "${has_gpu[@]}")"
fi

mkdir -p "$rows_dir" || die "cannot make $rows_dir"
trap 'rm -rf "$rows_dir"' EXIT
status=0
for config in "${configs[@]}"; do
    as_array command < <(measure_command "$config")
    echo "== $config: $(quoted "${command[@]}")"
    if command -v timeout >/dev/null 2>&1; then
        timeout "$(time_limit "$config")" "${command[@]}"
    else
        "${command[@]}"
    fi
    code=$?
    if [ "$code" = 124 ]; then
        echo "gpu_check: $config ran past $(time_limit "$config") s and was stopped" \
             "(GPU_CHECK_TIMEOUT sets the limit)" >&2
    fi
    [ "$code" = 0 ] || status=1
done
echo "== summary"
as_array command < <(report_command)
"${command[@]}" || status=1
echo "== decoding against transformers: $(quoted "${decode[@]}")"
if "${has_hf[@]}" >/dev/null 2>&1; then
    timeout "$timeout_s" "${decode[@]}" || { status=1; echo "gpu_check: the decode comparison" \
        "failed (see above)" >&2; }
else
    echo "gpu_check: decode comparison skipped: $hf_python has no torch and transformers" \
         "(set HF_PYTHON to a Python with both: pip install torch transformers)" >&2
fi
exit "$status"
