"""The order of micro-batches: each epoch a seeded shuffle, its largest micro-batches moved to the epoch's first step;
the run's first step is made of its longest examples.

A micro-batch's activations grow with its tokens (packed: the rows' sum; padded: rows x the longest), and no grouping
of any epoch can hold more than the longest examples together. So the first optimizer step of a run is its most
memory-hungry one, and an out-of-memory error comes within the first minute instead of at step 700 (or at the start
of epoch 3, whose shuffle happened to pack longer rows together). Deterministic from (seed, epoch): a resumed run
replays the same order. No torch here.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any


def micro_batch_tokens(rows: list[Any], packed: bool) -> int:
    """What a micro-batch costs in activations: its tokens packed end to end, or rows x the longest row padded."""
    lengths = [len(row.input_ids) for row in rows]
    return sum(lengths) if packed else len(lengths) * max(lengths, default=0)


def largest_first(batches: list[list[int]], sizes: list[int], count: int) -> list[list[int]]:
    """The `count` largest batches first (largest leading, ties by position), then the rest in their given order."""
    largest = sorted(range(len(batches)), key=lambda i: (-sizes[i], i))[:count]
    chosen = set(largest)
    rest = [i for i in range(len(batches)) if i not in chosen]
    return [batches[i] for i in largest + rest]


@dataclass
class Batcher:
    """Deterministic micro-batches: epoch e shuffles the examples with seed + e (epoch 0 then puts its longest
    examples first, enough for one optimizer step), cuts them into micro-batches and moves the `first_step_batches`
    largest to the front (the epoch's first optimizer step); position = micro-batch index."""

    examples: list[Any]
    micro_batch_size: int
    seed: int
    pad_id: int
    first_step_batches: int = 1  # grad_accum: the micro-batches of one optimizer step
    packed: bool = True
    _epoch_orders: dict[int, list[list[int]]] = field(default_factory=dict, repr=False)

    @property
    def batches_per_epoch(self) -> int:
        return math.ceil(len(self.examples) / self.micro_batch_size)

    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The example indices of each micro-batch of this epoch, in the order they train."""
        if epoch not in self._epoch_orders:
            order = list(range(len(self.examples)))
            random.Random(self.seed + epoch).shuffle(order)
            if epoch == 0 and self.first_step_batches:  # the run's first step: its longest examples, then the rest
                lead = self.micro_batch_size * self.first_step_batches
                longest = sorted(range(len(order)), key=lambda k: (-len(self.examples[order[k]].input_ids), k))[:lead]
                chosen = set(longest)
                order = [order[k] for k in longest] + [i for k, i in enumerate(order) if k not in chosen]
            size = self.micro_batch_size
            batches = [order[start:start + size] for start in range(0, len(order), size)]
            sizes = [micro_batch_tokens([self.examples[i] for i in batch], self.packed) for batch in batches]
            self._epoch_orders = {epoch: largest_first(batches, sizes, self.first_step_batches)}  # keep one epoch
        return self._epoch_orders[epoch]

    def batch(self, micro_index: int) -> list[Any]:
        epoch, within = divmod(micro_index, self.batches_per_epoch)
        return [self.examples[i] for i in self.epoch_order(epoch)[within]]
