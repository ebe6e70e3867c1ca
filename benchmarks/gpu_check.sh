#!/usr/bin/env bash
# The GPU check: configs/mini.py and configs/v3_mini.py in bfloat16 on one NVIDIA GPU, each in
# its own process (benchmarks/gpu_check.py), then one table. docs/gpu.md explains the columns.
set -u

usage() {
    cat <<'EOF'
usage: bash benchmarks/gpu_check.sh [--steps N] [--out FILE] [--hlo_dir DIR] [--dry_run]
                                    [--config.GROUP.FIELD=VALUE ...]

On a machine with an NVIDIA GPU: installs the `cuda` extra if JAX finds no GPU
(pip install -e ".[cuda]"), then for configs/mini.py and configs/v3_mini.py in bfloat16
(parameters stay float32) prints compile time, step time, tokens/s, MFU against the data-sheet
peak, peak device memory, and whether cuDNN attention and ragged_dot were used by the
compiled train step. About 3-5 minutes on one H100/H200 (plus the install, if needed).

  --steps N       timed steps per round, 3 rounds after 2 warm-ups (default 20)
  --out FILE      also write the table's rows as JSON to FILE (default: stdout only)
  --hlo_dir DIR   also keep each step's lowered and compiled HLO text in DIR/CONFIG/
  --dry_run       print the commands, run nothing
  --config.*      passed on to both configs, after the defaults, so they win, e.g.
                  --config.train.batch_size=16 (defaults: --config.compute.dtype=bfloat16
                  --config.devices.num_gpus=1: the GPU with the most free memory)
  -h, --help      this message

Exit status: 0 all measured, 1 a run failed (its row says why), 2 no NVIDIA GPU found.
Environment: PYTHON (default: python), GPU_CHECK_TIMEOUT (seconds per config, default 240).
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
            die "the configs are fixed (mini, v3_mini); override fields with" \
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
configs=(mini v3_mini)
has_gpu=("$python" -c 'import jax; jax.devices("gpu")')
install=("$python" -m pip install -e ".[cuda]")

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
measure_command() {  # the measuring run of config $1
    local command=("$python" benchmarks/gpu_check.py --config "configs/$1.py"
                   --config.compute.dtype=bfloat16 --config.devices.num_gpus=1
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
        echo "timeout $timeout_s $(quoted "${command[@]}")"
    done
    as_array command < <(report_command)
    quoted "${command[@]}"; echo
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
    echo "gpu_check: no NVIDIA GPU found ($reason); it would have run configs/mini.py and" \
         "configs/v3_mini.py in bfloat16, $steps steps x 3 rounds each, as: ${joined%; }" >&2
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
        timeout "$timeout_s" "${command[@]}"
    else
        "${command[@]}"
    fi
    code=$?
    if [ "$code" = 124 ]; then
        echo "gpu_check: $config ran past ${timeout_s} s and was stopped" \
             "(GPU_CHECK_TIMEOUT sets the limit)" >&2
    fi
    [ "$code" = 0 ] || status=1
done
echo "== summary"
as_array command < <(report_command)
"${command[@]}" || status=1
exit "$status"
