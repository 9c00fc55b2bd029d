"""Replaying the blocks below an edited layer from their recorded output.

A REP edit at several layers (REP-MEMIT, REP-EMMET, REP-AlphaEdit) collects keys once per layer,
bottom-up, over the same texts, installing each layer's adapter before the next collection. What
changes between collections (the adapters; the backend's update, made before the first or after
the last) sits at or above the layer just collected, never below it. So each collection records
what the last block below its module returns, batch by batch, and the next one starts there: the
blocks below return the recorded output instead of running. A collection at layer l then runs
only the blocks from the previous edited layer up to l (MEMIT's layers 2, 3, 4: 3 + 2 + 2 blocks
per batch instead of 3 + 4 + 5). The replayed keys equal the re-run ones (`tests/test_replay.py`).

The module knows nothing about collection: `collect_keys_flat(..., replay=...)` asks it for the
batches to run (the first collection's, so every one runs the same padded batches) and wraps each
forward in `replay.running(i)`.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch
from torch import nn

_NO_FORWARD = object()


class BlockReplay:
    """Recorded block outputs per batch for the texts of one request's collections.

    blocks: the model's blocks in the order the forward runs them (at least up to the highest
    edited layer's); a collection at a module inside block b records block b-1's output and
    replays the deepest output an earlier collection recorded."""

    def __init__(self, blocks: Sequence[nn.Module]):
        self.blocks = list(blocks)
        self.batches: list[list[int]] | None = None  # the first collection's batches (text indices)
        self.input_ids: torch.Tensor | None = None  # what the first collection ran (token ids, padded)
        self.replayed = -1                           # blocks[: replayed + 1] are replayed
        self.outputs: dict[int, object] = {}         # batch -> output of blocks[replayed]
        self._recording = -1                         # the block the current collection records
        self._recorded: dict[int, object] = {}

    def plan(self, batches: list[list[int]], input_ids: torch.Tensor, module: nn.Module) -> list[list[int]]:
        """Start a collection at `module`; returns the batches to run (the first collection's)."""
        if self.batches is None:
            self.batches, self.input_ids = batches, input_ids
        elif input_ids.shape != self.input_ids.shape or not torch.equal(input_ids, self.input_ids):
            raise ValueError("BlockReplay replays the texts of its first collection; these differ "
                             "(use one BlockReplay per set of texts)")
        self._commit()
        block = next((i for i, b in enumerate(self.blocks) if any(m is module for m in b.modules())), None)
        if block is None:
            raise ValueError("BlockReplay: the hooked module lies in none of its blocks")
        if block - 1 < self.replayed:
            raise ValueError("BlockReplay collects bottom-up: this module lies below an earlier collection's")
        self._recording = block - 1 if block - 1 > self.replayed else -1
        self._recorded = {}
        return self.batches

    def _commit(self) -> None:
        """What the last collection recorded becomes what the next ones replay."""
        if self._recording > self.replayed and self.batches is not None \
                and len(self._recorded) == len(self.batches):
            self.replayed, self.outputs = self._recording, self._recorded
        self._recording, self._recorded = -1, {}

    @contextlib.contextmanager
    def running(self, index: int) -> Iterator[None]:
        """Within: batch `index` runs from the replayed output up and records the next one."""
        with contextlib.ExitStack() as stack:
            if self._recording >= 0:
                def record(_module, _args, output):
                    self._recorded[index] = output  # collections run without gradients

                stack.callback(self.blocks[self._recording].register_forward_hook(record).remove)
            if self.replayed >= 0:
                recorded = self.outputs[index]

                def replayed(*_args, **_kwargs):
                    return recorded

                for block in self.blocks[: self.replayed + 1]:
                    stack.callback(_put_back, block, block.__dict__.get("forward", _NO_FORWARD))
                    block.forward = replayed
            yield


def _put_back(block: nn.Module, old) -> None:
    if old is _NO_FORWARD:
        del block.forward
    else:
        block.forward = old
