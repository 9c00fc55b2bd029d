"""Compare benchmark runs side by side (`rep_easyedit.eval.compare`): comparison.md and plots.

    python benchmarks/compare_runs.py --runs runs/ROME runs/REP-ROME --out runs/compare [--first 20]
"""

from rep_easyedit.eval.compare import main

if __name__ == "__main__":
    main()
