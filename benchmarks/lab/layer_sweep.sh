#!/usr/bin/env bash
# ROME layer sweep on a model's dev data: one run per layer, the runner's own metrics.
# usage: benchmarks/lab/layer_sweep.sh MODEL DATA "LAYERS" SKIP LIMIT OUT [metrics]
# e.g.   benchmarks/lab/layer_sweep.sh gemma3-270m counterfact_gemma3_dev "1 2 4 6" 5 4 benchmarks/results/gemma3_layers
set -euo pipefail
model=$1; data=$2; layers=$3; skip=$4; limit=$5; out=$6
metrics=${7:-[success,paraphrase,locality,rephrase]}
PY=${PY:-.venv/bin/python}
for layer in $layers; do
  OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$PY" "${RUNNER:-benchmarks/run_benchmark.py}" alg=ROME model="$model" data="$data" \
    skip="$skip" limit="$limit" out="$out/ROME-L$layer" "+set.layers=[$layer]" data.metrics="$metrics" \
    fluency_tokens=0 progress=false
done
