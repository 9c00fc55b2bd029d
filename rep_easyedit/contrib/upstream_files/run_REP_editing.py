import argparse
import json
import sys

sys.path.append('..')
from easyeditor import BaseEditor, REPHyperParams


# One CounterFact-style case; `subject_rephrase` lists surface forms of the subject. REP trains its
# adapter on the first half and the second half only tests it.
REQUEST = {
    "prompt": "Toyota Celica is created by",
    "subject": "Toyota Celica",
    "ground_truth": "Toyota",
    "target_new": "Cadillac",
    "subject_rephrase": ["Celica by Toyota", "the Toyota Celica coupe", "Toyota's Celica", "the Celica"],
    "case_id": 0,
}

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument('--hparams_dir', default='../hparams/REP-ROME/llama-7b.yaml', type=str)
    parser.add_argument('--sequential_edit', action="store_true")
    args = parser.parse_args()

    hparams = REPHyperParams.from_hparams(args.hparams_dir)
    editor = BaseEditor.from_hparams(hparams)
    # REP reads per-request fields (`subject_rephrase`, `case_id`) that `edit(prompts=...)` does
    # not forward: hand the editor the requests themselves
    request = dict(REQUEST, portability={}, locality={})
    metrics, edited_model, _ = editor.edit_requests([request], sequential_edit=args.sequential_edit)
    print(json.dumps({"post": metrics[0]["post"], "rep": metrics[0]["requested_rewrite"]["rep"]["health"]},
                     indent=2, default=str))
