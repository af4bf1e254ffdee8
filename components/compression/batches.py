"""Calibration batches shared by the compression methods that train (Bit-Delta scales, pruning
recovery, distillation): right-padded token batches and a seeded, epoch-after-epoch order.

Right padding with token 0 is safe because every loss here is masked to real tokens, so the
padded id is never read; the order is a fresh ``randperm`` from one seeded generator each time
the previous pass is used up, so a run is reproducible from its seed.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch


def pad_right(rows: Sequence[Sequence[int]], length: int | None = None) -> torch.Tensor:
    """``rows`` right-padded with 0 to ``length`` (default: the longest row), as a long tensor."""
    length = max(len(r) for r in rows) if length is None else length
    out = torch.zeros(len(rows), length, dtype=torch.long)
    for i, row in enumerate(rows):
        out[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    return out


def pad_batch(sequences: Sequence[Sequence[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask) of ``sequences``, right-padded."""
    return pad_right(sequences), pad_right([[1] * len(s) for s in sequences])


def seeded_batches(n_items: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Endless batches of ``min(batch_size, n_items)`` indices, reshuffled after each pass."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while True:
        batch = []
        while len(batch) < min(batch_size, n_items):
            if not order:
                order = torch.randperm(n_items, generator=generator).tolist()
            batch.append(order.pop())
        yield batch
