"""Benchmark an editing method case by case (the runner is `rep_easyedit.eval.runner`).

    python benchmarks/run_benchmark.py alg=REP-ROME model=smollm2-135m \
        data=counterfact_smollm2_dev limit=20 out=runs/rep-rome shard=0/1

Config groups live in benchmarks/conf (`alg`, `model`, `data`); `data=FILE.json` and
`model=/path/to/model` take any file or local model. See the runner's docstring for resume,
shards and what each case line holds.
"""

import sys

import hydra

from rep_easyedit.eval.runner import CONF, main, rewrite_argv

if __name__ == "__main__":
    sys.argv = rewrite_argv(sys.argv)
    hydra.main(config_path=str(CONF), config_name="config", version_base=None)(main)()
