"""Edit one fact in the bundled SmolLM2-135M-Instruct with ROME and with REP-ROME, side by side.

    make demo            # or: OMP_NUM_THREADS=2 python examples/quickstart.py [--case FILE]

Both edits go through EasyEdit's own `BaseEditor.edit`; REP-ROME is registered by
`import rep_easyedit`. After each edit the robustness queries (rephrased subject, shuffled subject
tokens, long unrelated context in front of the prompt) are scored with greedy exact match; the
"in" variants are those REP trained on, the "out" ones it never saw.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
from pathlib import Path

import torch
from tqdm import tqdm

import rep_easyedit  # noqa: F401  registers REP-ROME with EasyEdit
from rep_easyedit.core.perturbations import build_perturbations
from rep_easyedit.corpus import load_corpus
from rep_easyedit.editing import keep_edit_kwargs, load_hparams, restore_snapshot, snapshot
from rep_easyedit.eval.metrics import evaluate_case, locality_reference

ROOT = Path(__file__).resolve().parents[1]

METHODS = {"ROME": ROOT / "hparams/ROME/smollm2-135m.yaml",
           "REP-ROME": ROOT / "hparams/REP-ROME/smollm2-135m.yaml"}
COLUMNS = [("success", "success"), ("paraphrase", "paraphrase"), ("locality", "locality"),
           ("rephrase_in", "rephrased subj. (in)"), ("rephrase_out", "rephrased subj. (out)"),
           ("shuffle_in", "shuffled subj. (in)"), ("shuffle_out", "shuffled subj. (out)"),
           ("long_in", "long context (in)"), ("long_out", "long context (out)")]


def edit_with_editor(editor, case: dict, log) -> dict:
    """One `BaseEditor.edit` call, keeping the edit in the model; EasyEdit's chatter goes to `log`."""
    with contextlib.redirect_stdout(log):
        metrics, _, _ = editor.edit(
            prompts=[case["prompt"]], target_new=[case["target_new"]], ground_truth=[case["target_true"]],
            subject=[case["subject"]], subject_rephrase=[case["subject_rephrase"]],
            case_id=[case["case_id"]], **keep_edit_kwargs())
    return metrics[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default=str(ROOT / "examples/data/quickstart_case.json"))
    ap.add_argument("--log", default=str(ROOT / "logs/quickstart.log"))
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    logging.getLogger("easyeditor").setLevel(logging.WARNING)
    case = json.loads(Path(args.case).read_text())[0]
    Path(args.log).parent.mkdir(parents=True, exist_ok=True)
    log = open(args.log, "w")
    from easyeditor import BaseEditor

    print(f"Edit: {case['prompt']!r} {case['target_true']} -> {case['target_new']}  "
          f"(subject {case['subject']!r}); EasyEdit's log: {args.log}")
    rows = {}
    steps = tqdm(total=3 * len(METHODS), desc="quickstart", unit="step")
    for name, yaml_path in METHODS.items():
        hparams = load_hparams(yaml_path)
        steps.set_postfix_str(f"{name}: loading the model")
        with contextlib.redirect_stdout(log):
            editor = BaseEditor.from_hparams(hparams)
        model, tok = editor.model, editor.tok
        # both methods are scored on the variants REP-ROME trains on / holds out (seeded per case)
        rep_cfg = load_hparams(METHODS["REP-ROME"]).rep
        corpus = load_corpus(None, model, tok, seed=rep_cfg.seed)
        pert = build_perturbations(case, tok, corpus, n_shuffles=rep_cfg.n_shuffles,
                                   n_long=rep_cfg.n_long_contexts,
                                   long_tokens=rep_cfg.long_context_tokens, base_seed=rep_cfg.seed)
        ref = locality_reference(model, tok, case)
        state = snapshot(model)
        steps.update()
        steps.set_postfix_str(f"{name}: editing (~30 s)")
        torch.manual_seed(0)
        metrics = edit_with_editor(editor, case, log)
        steps.update()
        steps.set_postfix_str(f"{name}: evaluating")
        scores = evaluate_case(model, tok, case, pert, ref, fluency=False)
        scores["edit_seconds"] = metrics["time"]
        rows[name] = scores
        restore_snapshot(model, state)
        steps.update()
        del editor, model
    steps.close()
    log.close()
    print()
    header = ["method"] + [label for _, label in COLUMNS] + ["edit s"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, scores in rows.items():
        cells = ["–" if scores[k] is None else f"{100 * scores[k]:.0f}" for k, _ in COLUMNS]
        print(f"| {name} | " + " | ".join(cells) + f" | {scores['edit_seconds']:.1f} |")
    print("\nRates in percent (greedy exact match) on this one fact; 'in' variants trained REP's adapter, "
          "'out' were never seen.\nOne hundred facts per method, with the cost of each stage: docs/results.md.")


if __name__ == "__main__":
    main()
