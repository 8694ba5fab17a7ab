"""Datasets and the collator the trainer reads: SFT examples and DPO pairs, right-padded."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from training.data import IGNORE, DPOExample, SFTExample

__all__ = ["ExampleDataset", "PairDataset", "collate"]


class ExampleDataset(torch.utils.data.Dataset):
    """SFT examples as dicts the collator pads; ``idx`` ties a row back to its group."""

    def __init__(self, examples: Sequence[SFTExample]) -> None:
        self.examples = list(examples)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, Any]:
        ex = self.examples[i]
        return {"input_ids": ex.input_ids, "labels": ex.labels, "idx": i}


class PairDataset(torch.utils.data.Dataset):
    """DPO pairs: chosen and rejected sequences of one preference."""

    def __init__(self, pairs: Sequence[DPOExample]) -> None:
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict[str, Any]:
        p = self.pairs[i]
        return {"chosen": p.chosen, "rejected": p.rejected, "idx": i}


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    width = max(len(s) for s in seqs)
    return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def collate(rows: list[dict[str, Any]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch; DPO rows become 2B sequences (chosen first, then rejected)."""
    if "chosen" in rows[0]:
        seqs = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
        ids = [s.input_ids for s in seqs]
        labels = [s.labels for s in seqs]
    else:
        ids = [r["input_ids"] for r in rows]
        labels = [r["labels"] for r in rows]
    input_ids = _pad(ids, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": _pad([[1] * len(s) for s in ids], 0),
        "labels": _pad(labels, IGNORE),
        "idx": torch.tensor([r["idx"] for r in rows], dtype=torch.long),
    }
