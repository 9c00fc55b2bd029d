"""Pathway health: did REP do anything for this edit?

A recipe that does not transfer to a model (the paper's on SmolLM2, for one) trains an adapter
whose gate never opens: the edit is then exactly the base method's, and nothing says so. Every
REP edit therefore reports, per edited layer, what its adapter does to the keys it trained on,
and flags an edit whose pathway is not effective: a warning naming the cause and the fix, or,
with `rep.strict: true`, an error raised before the model is left changed.

Where it sits: `metrics[i]["requested_rewrite"]["rep"]["health"]` after `BaseEditor.edit`
(`request["rep"]["health"]` of the request passed to `apply_rep_to_model`):
`{"effective": bool, "layers": {module path: {...}}}`, each layer holding `gate_pos_fire`
(share of held-in positive keys where the hard gate fires), `gate_neg_fire` (share of the gate
negatives where it fires), `distance_before` / `distance_after` (mean ‖k_s − k*‖/‖k*‖ of the held-in
variants' keys before training and through the trained adapter), `steps` (training steps used),
`effective` and `cause` (null, or why not).
"""

from __future__ import annotations

import logging

logger = logging.getLogger("rep_easyedit")

# keys "moved" when the adapter brought the held-in keys this much (relative) closer to k*
MIN_DISTANCE_GAIN = 0.1


class IneffectivePathwayError(RuntimeError):
    """`rep.strict: true` and an edit's pathway would do nothing."""


def layer_health(report) -> dict:
    before, after = report.distance_before, report.distance_after
    cause = None
    if report.gate_pos_fire <= 0.0:
        cause = "the gate fires on none of the held-in variant keys"
    elif before > 0 and after > (1.0 - MIN_DISTANCE_GAIN) * before:
        cause = (f"the held-in variant keys did not move towards k* "
                 f"(relative distance {before:.3f} -> {after:.3f})")
    return {"gate_pos_fire": report.gate_pos_fire, "gate_neg_fire": report.gate_neg_fire,
            "distance_before": before, "distance_after": after, "steps": report.steps,
            "effective": cause is None, "cause": cause}


def pathway_health(reports: dict) -> dict:
    """{path: TrainingReport} of one request -> the health record stored with its metrics."""
    layers = {path: layer_health(report) for path, report in reports.items()}
    return {"effective": all(h["effective"] for h in layers.values()), "layers": layers}


FIX = ("train harder or let the gate learn: raise `rep.steps` / `rep.lr`, set `rep.gate_weight` > 0, "
       "or use the default recipe (`aggregation: match`, the REPConfig defaults); see README "
       "'Pathway health'")


def check_health(health: dict, rep, request: dict) -> None:
    """Warn (or, with `rep.strict`, raise) when an edit's pathway does nothing."""
    if health["effective"]:
        return
    causes = "; ".join(f"{path}: {h['cause']}" for path, h in health["layers"].items() if h["cause"])
    message = (f"REP pathway not effective for subject {request.get('subject')!r} ({causes}): "
               f"this edit is the base method's alone. Fix: {FIX}.")
    if rep.strict:
        raise IneffectivePathwayError(message + " (rep.strict: true; the model is unchanged)")
    logger.warning(message)
