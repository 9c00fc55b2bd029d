"""Replaying the blocks below the lowest edited layer from their recorded output.

A REP edit at several layers (REP-MEMIT, REP-EMMET, REP-AlphaEdit) collects keys once per layer,
bottom-up, each after the adapters below it are installed, over the same texts. Nothing below the
lowest edited block changes between those collections (the adapters and the backend's update sit
at or above it), so the first collection records what the last block below it returns, batch by
batch, and every later one starts there: the blocks below return the recorded output instead of
running. A collection at layer l then costs the blocks from the lowest edited one up to l, not
all l of them. The replayed keys equal the re-run ones (`tests/test_replay.py`).

The module knows nothing about collection: `collect_keys_flat(..., replay=...)` asks it for the
batches to run (the first pass's, so every pass runs the same padded batches) and wraps each
forward in `replay.running(i)`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

_NO_FORWARD = object()


class BlockReplay:
    """The recorded outputs of `blocks[-1]` per batch, for the texts of one collection.

    blocks: every block the forward runs before the lowest edited one, in order (their outputs are
    skipped on replay; the last one's is what the first edited block receives)."""

    def __init__(self, blocks: Sequence[nn.Module]):
        if not blocks:
            raise ValueError("BlockReplay needs at least one block below the lowest edited layer")
        self.blocks = list(blocks)
        self.batches: list[list[int]] | None = None  # the first pass's batches (text indices)
        self.input_ids: torch.Tensor | None = None  # what the first pass ran (token ids, padded)
        self.outputs: dict[int, object] = {}

    def plan(self, batches: list[list[int]], input_ids: torch.Tensor) -> list[list[int]]:
        """The batches to run: the given ones on the first pass, the recorded ones afterwards."""
        if self.batches is None:
            self.batches, self.input_ids = batches, input_ids
        elif input_ids.shape != self.input_ids.shape or not torch.equal(input_ids, self.input_ids):
            raise ValueError("BlockReplay replays the texts of its first collection; these differ "
                             "(use one BlockReplay per set of texts)")
        return self.batches

    @contextlib.contextmanager
    def running(self, index: int) -> Iterator[None]:
        """Within: record batch `index`'s output of the last block below, or replay it."""
        if index not in self.outputs:
            def record(_module, _args, output):
                self.outputs[index] = output  # collections run without gradients

            handle = self.blocks[-1].register_forward_hook(record)
            try:
                yield
            finally:
                handle.remove()
            return
        recorded = self.outputs[index]
        saved = [block.__dict__.get("forward", _NO_FORWARD) for block in self.blocks]

        def replayed(*_args, **_kwargs):
            return recorded

        try:
            for block in self.blocks:
                block.forward = replayed
            yield
        finally:
            for block, old in zip(self.blocks, saved):
                if old is _NO_FORWARD:
                    del block.forward
                else:
                    block.forward = old

