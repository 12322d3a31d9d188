#!/usr/bin/env bash
# One GPU session's work for issue 13, in parts that each fit one device call (10 minutes):
#
#   bash benchmarks/gpu_session.sh tests        # pytest -m gpu (bf16 packing, QLoRA, Liger, MFU table)  ~5 min
#   bash benchmarks/gpu_session.sh bench-0.5b   # sftune vs TRL, Qwen2.5-0.5B shape, 4 rows               ~6 min
#   bash benchmarks/gpu_session.sh bench-1b     # sftune vs TRL, Llama-3.2-1B shape, 4 rows               ~7 min
#   bash benchmarks/gpu_session.sh profile      # one profiled step per library, packed full fine-tuning  ~4 min
#   bash benchmarks/gpu_session.sh smoke        # the CPU dry run of the benchmark (any machine)
#
# Several parts may be named in one call. The wheels listed in benchmarks/GPU.md must be in .whl/ (carried with
# the call: carry [".whl"]). Results go under $OUT (the device tool's folder; runs/gpu-session elsewhere): at most
# 8 files come back from a device call, so each part leaves two, its log and <part>.tar.gz (log, results.jsonl,
# figures.jsonl of the tests, profiles, error logs), plus versions.txt: three parts fit in one call.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/gpu-session}
WORK=/tmp/gpu-session
mkdir -p "$OUT" "$WORK"
PART_TIMEOUT=${PART_TIMEOUT:-560}

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "installing the carried wheels failed"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
else
    echo "no .whl/ folder: using the packages already installed"
    export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONWARNINGS=ignore

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv 2>&1
    python3 - <<'PY'
import importlib.metadata as md
for name in ["torch", "transformers", "peft", "accelerate", "triton", "datasets", "trl", "bitsandbytes",
             "liger-kernel", "pyarrow", "fsspec", "huggingface-hub", "numpy"]:
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        print(f"{name}: MISSING")
PY
} > "$WORK/versions.txt" 2>&1
cat "$WORK/versions.txt"
cp "$WORK/versions.txt" "$OUT/versions.txt"

run_part() {
    local part=$1 log="$WORK/$1.log"
    echo "=== $part ($(date -u +%T))"
    case "$part" in
        tests)
            rm -f "$WORK/figures.jsonl"
            SFTUNE_GPU_FIGURES="$WORK/figures.jsonl" timeout "$PART_TIMEOUT" \
                python3 -m pytest -m gpu -q -rA -p no:cacheprovider tests/gpu 2>&1 | tee "$log"
            ;;
        bench-0.5b | bench-1b)
            local model=qwen2.5-0.5b
            [ "$part" = bench-1b ] && model=llama-3.2-1b
            timeout "$PART_TIMEOUT" python3 benchmarks/gpu_compare.py --models "$model" --out-dir "$WORK/$part" 2>&1 \
                | tee "$log"
            ;;
        profile)
            timeout "$PART_TIMEOUT" python3 benchmarks/gpu_compare.py --tunings full --packings packed --steps 6 \
                --warmup 2 --profile --out-dir "$WORK/$part" 2>&1 | tee "$log"
            ;;
        smoke)
            timeout "$PART_TIMEOUT" python3 benchmarks/gpu_compare.py --device cpu --tiny --profile \
                --out-dir "$WORK/$part" 2>&1 | tee "$log"
            ;;
        *)
            echo "unknown part $part (tests, bench-0.5b, bench-1b, profile, smoke)"
            return 2
            ;;
    esac
    local status=${PIPESTATUS[0]}
    cp "$log" "$OUT/$part.log"
    tar -czf "$OUT/$part.tar.gz" -C "$WORK" "$part.log" $( [ -d "$WORK/$part" ] && echo "$part" ) \
        $( [ "$part" = tests ] && [ -f "$WORK/figures.jsonl" ] && echo figures.jsonl )
    echo "=== $part done: exit $status ($(date -u +%T))"
    return "$status"
}

status=0
for part in "${@:-tests}"; do
    run_part "$part" || status=1
done
exit $status
