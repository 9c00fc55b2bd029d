"""The `rep:` section of a REP hparams YAML, as a dataclass validated by OmegaConf."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

TRAIN_ON_CHOICES = ("subject", "rephrase", "shuffle", "long")


# Defaults changed after runs were recorded: field -> the default a run that did not record it ran
# with. Resume checks read it (the runner's run.json, lifelong.py's progress), so old and new cases never
# mix. Add an entry whenever a default changes; a field added later needs none when its default is the
# behaviour from before it existed.
CHANGED_DEFAULTS: dict = {
    "steps": 200,               # -> 120: capping at 120 left every probed score where 200 put it (docs/results.md)
    "screen_negatives": 0.0,    # -> 1e-3: the same scores in 0.4-0.7 x the training time
    # -> on, the candidate hard negatives mined (docs/results.md "The default recipe"): names of the
    # subject's kind and the answer's tokens, kept where a first gate fires on them
    "kin_negatives": 0,         # -> 8
    "kin_mine": False,          # -> True
    "answer_negatives": False,  # -> True
    "answer_mine": False,       # -> True
}


@dataclass
class REPConfig:
    # adapter
    rank: int = 32                 # bottleneck r of D -> r -> D
    gate_ratio: float = 0.1        # gate hidden size = ceil(gate_ratio * D)
    tau: float = 0.9               # hard-gate threshold at inference
    # training (the default recipe: chosen on both bundled models, docs/results.md "The default recipe")
    steps: int = 120               # cap on Adam steps; with adaptive_stop training usually ends earlier
    lr: float = 3e-3
    alpha: float = 1.0             # weight of the consistency loss
    gate_weight: float = 1.0       # weight of the gate BCE loss (0: no gate training, paper-style)
    # weight of a loss that keeps the adapter's move of the negatives' keys near 0 (‖Δk‖²/‖k*‖²), so a
    # neighbour the gate fires on by mistake keeps (most of) its key; 0: only the gate guards them
    negative_delta_weight: float = 0.0
    aggregation: str = "match"     # "match" (pull onto k*) or "cosine" (paper, whitened)
    # the adapter's map Δ: "identity" (starts at Δ = 0, trained by Adam with the gate) or "least_squares"
    # (`match` only: solved as the rank-r ridge fit of the aggregation and consistency losses and kept,
    # only the gate trains; core/delta_init.py); delta_init_ridge: that fit's ridge, relative to the keys'
    # mean squared norm
    delta_init: str = "identity"
    delta_init_ridge: float = 1e-2
    aggregation_abs: bool = False  # paper's |.| around the cosine
    # cosine's target: C⁻¹k* (true) or k* (false); null = C⁻¹k* where the backend uses covariance
    # statistics (ROME/R-ROME with mom2_adjustment, MEMIT, EMMET). `match` always pulls onto k*.
    whiten_target: Optional[bool] = None
    # train the adapters on keys read after the backend's update instead of before it. Multi-layer
    # backends (MEMIT, EMMET over several layers) move the keys of the upper edited layers when
    # they update the lower ones; a one-layer edit reads the same keys either way.
    fit_after_update: bool = False
    # several layers: each layer's key collection records what the block below it returns and the
    # next layer's starts there instead of re-running the blocks below (same keys, fewer blocks
    # run; core/replay.py); false = every layer's collection runs from the embeddings
    replay_blocks: bool = True
    # lifelong editing: 0 = every edit adds its own adapter per layer (forward cost grows with the
    # number of edits); R > 0 = each layer's adapters, earlier ones included, are merged into one of
    # rank R, retrained on every kept edit's keys, before the backend's update (core/merging.py)
    merge_rank: int = 0
    merge_negatives_per_edit: int = 256  # negatives kept per edit for later merges (memory bound)
    merge_steps: int = 200         # cap on a merge's Adam steps (it trains on every kept edit's keys at once)
    # adaptive stop (training.train_adapter): from min_steps on, stop once the aggregation loss has
    # plateaued (< stop_plateau relative gain over 10 steps) and the hard gate separates (at least
    # stop_pos_fire of the positives fire, at most stop_neg_fire of the negatives)
    adaptive_stop: bool = True
    min_steps: int = 30
    stop_plateau: float = 0.03
    stop_pos_fire: float = 0.95
    stop_neg_fire: float = 0.01
    # > 0 (aggregation "match"): the held-in keys also count as on target once their mean squared
    # relative distance to k* is below stop_distance² (whether or not the loss still falls)
    stop_distance: float = 0.0
    # an edit whose pathway does nothing (health.py): warn (false) or raise before the model changes
    strict: bool = False
    num_negatives: int = 1024      # gate negatives sampled per edit
    negatives_per_step: int = 0    # > 0: each training step's gate loss sees a fresh sample of this many (0: all)
    # > 0: from the second stop window on, each window's gate loss leaves out the negatives whose gate
    # probability is below this (their gradient is at most this each); 0: every negative, every step
    screen_negatives: float = 1e-3
    corpus_negative_texts: int = 8  # corpus spans whose tokens are gate negatives
    sibling_negatives: int = 0     # names sharing the subject's leading words, as gate negatives (hard)
    # the subject's proper token prefixes and this many shuffles of its tokens before the last word, as
    # gate negatives (hard); -1 = off, 0 = the prefixes only (perturbations.partial_subjects)
    partial_negatives: int = -1
    # this many names of the subject's kind, sampled from the model itself (a list continued after the
    # old fact: "BMW E31" for "BMW E23"), as gate negatives (hard); 0 = off (core/kin_names.py)
    kin_negatives: int = 8
    # with kin_negatives: train once without the names, keep only those the gate then fires on, and
    # train a fresh adapter with them (the others would only tighten the gate around the positives)
    kin_mine: bool = True
    # the tokens of target_new after the edit prompt (with each trained variant) as gate negatives
    # (hard): a gate that fires inside the answer puts the edit's value there (rep_main.answer_texts)
    answer_negatives: bool = True
    # with answer_negatives: keep only the answer's tokens the gate trained without them fires on (as
    # kin_mine does with the names); every answer token as a negative tightens the gate everywhere
    answer_mine: bool = True
    train_on: List[str] = field(default_factory=lambda: ["subject", "rephrase", "shuffle", "long"])
    # beyond the paper: fit the backend's value over the in-domain variant prompts as well (ROME's v*
    # for ROME, R-ROME and EMMET, MEMIT's z); see rep_easyedit/robust_value.py
    value_on_variants: bool = False
    value_variant_templates: int = 3   # context templates per variant in that fit
    value_variant_weight: float = 1.0  # a variant prompt's weight in that fit's NLL (an edit prompt's: 1)
    # > 0 (ROME's value): this many names of the subject's kind, sampled from the model as for
    # kin_negatives, enter that fit as neighbours that receive the update's share of the shift, their
    # next-token KL from the unedited model weighted value_anchor_weight (robust_value.VariantFit).
    # The share is uᵀk / uᵀk* along the left vector the backend hands ROME's compute_v: ROME's own u;
    # R-ROME's and EMMET's update direction C⁻¹k (EMMET: a lone request's, C0⁻¹k)
    value_anchors: int = 0
    value_anchor_weight: float = 1.0
    # an anchor whose key at its last token gets more than this share of the update (uᵀk/uᵀk*) is
    # left out: the update cannot tell it from the subject ("BMW E25" for "BMW E23" on Gemma-3)
    value_anchor_max_share: float = 0.5
    # perturbations
    n_shuffles: int = 10
    n_long_contexts: int = 4
    long_context_tokens: int = 512
    # corpus for long contexts / negatives / covariance: text files; null = sampled from the model
    corpus: Optional[List[str]] = None
    seed: int = 0

    def check(self) -> None:
        bad = [t for t in self.train_on if t not in TRAIN_ON_CHOICES]
        if bad:
            raise ValueError(f"rep.train_on: unknown {bad}; choose from {list(TRAIN_ON_CHOICES)}")
        if self.aggregation not in ("match", "cosine"):
            raise ValueError(f"rep.aggregation: {self.aggregation!r}; use 'match' or 'cosine'")
        if self.delta_init not in ("identity", "least_squares"):
            raise ValueError(f"rep.delta_init: {self.delta_init!r}; use 'identity' or 'least_squares'")
        if self.delta_init == "least_squares" and self.aggregation != "match":
            raise ValueError("rep.delta_init: least_squares fits the `match` losses; with aggregation "
                             f"{self.aggregation!r} use delta_init: identity")
        if self.delta_init_ridge <= 0:
            raise ValueError(f"rep.delta_init_ridge must be > 0, got {self.delta_init_ridge}")
        if self.whiten_target and self.aggregation != "cosine":
            raise ValueError("rep.whiten_target applies to aggregation: cosine; with 'match' the "
                             "adapter pulls keys onto k* itself (set whiten_target: null)")
        if self.fit_after_update and self.value_on_variants:
            raise ValueError("rep.value_on_variants fits v* through the variants' adapters, which "
                             "rep.fit_after_update trains only after the update; choose one")
        if not 0.0 < self.tau < 1.0:
            raise ValueError(f"rep.tau must lie in (0, 1), got {self.tau}")
        for name in ("stop_plateau", "stop_pos_fire", "stop_neg_fire", "stop_distance"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"rep.{name} must lie in [0, 1], got {getattr(self, name)}")
        for name in ("rank", "steps", "min_steps", "n_shuffles", "n_long_contexts", "long_context_tokens",
                     "num_negatives", "negatives_per_step", "corpus_negative_texts", "sibling_negatives", "kin_negatives", "merge_rank",
                     "merge_negatives_per_edit", "merge_steps"):
            if getattr(self, name) < 0 or (name == "rank" and self.rank == 0):
                raise ValueError(f"rep.{name} must be positive, got {getattr(self, name)}")
        if self.partial_negatives < -1:
            raise ValueError(f"rep.partial_negatives: -1 (off), 0 (prefixes only) or more, got {self.partial_negatives}")
        if self.value_anchors < 0 or self.value_anchor_weight < 0 or self.value_anchor_max_share < 0:
            raise ValueError("rep.value_anchors, rep.value_anchor_weight and rep.value_anchor_max_share "
                             f"must be >= 0, got {self.value_anchors}, {self.value_anchor_weight} and "
                             f"{self.value_anchor_max_share}")
        if self.value_variant_weight <= 0 or self.value_variant_templates < 1:
            raise ValueError("rep.value_variant_weight must be > 0 and rep.value_variant_templates >= 1, got "
                             f"{self.value_variant_weight} and {self.value_variant_templates}")
        if self.negative_delta_weight < 0:
            raise ValueError(f"rep.negative_delta_weight must be >= 0, got {self.negative_delta_weight}")
        if not 0.0 <= self.screen_negatives < 0.5:
            raise ValueError(f"rep.screen_negatives: a gate probability in [0, 0.5) (0 = off), got {self.screen_negatives}")
        if self.lr <= 0:
            raise ValueError(f"rep.lr must be > 0, got {self.lr}")
