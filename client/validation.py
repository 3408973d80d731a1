"""`mobiserve validate`'s bookkeeping: how the answers scored, overall and per label.

Labels are compared with the wnid the server answers with, so no synsets file is needed; one
given with --synsets only names the classes and rejects labels it does not know.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mobiserve.client._results import Classification


@dataclass
class LabelScore:
    count: int = 0
    top1: int = 0
    top5: int = 0


@dataclass
class Tally:
    """Top-1 / top-5 hits, overall and per true label."""

    names: dict[str, str] = field(default_factory=dict)  # wnid -> class name, from synsets or answers
    per_label: dict[str, LabelScore] = field(default_factory=dict)

    def add(self, label: str, result: Classification) -> None:
        wnids = [c.wnid for c in result.classes]
        score = self.per_label.setdefault(label, LabelScore())
        score.count += 1
        score.top1 += wnids[:1] == [label]
        score.top5 += label in wnids[:5]
        for c in result.classes:
            self.names.setdefault(c.wnid, c.name)

    @property
    def count(self) -> int:
        return sum(s.count for s in self.per_label.values())

    def accuracy(self) -> tuple[float, float]:
        n = self.count or 1
        return (sum(s.top1 for s in self.per_label.values()) / n, sum(s.top5 for s in self.per_label.values()) / n)

    def worst(self, n: int) -> list[dict[str, Any]]:
        """The `n` labels with the lowest top-1, then top-5, accuracy (more images first); misses only."""
        missed = [(label, s) for label, s in self.per_label.items() if s.top1 < s.count]
        missed.sort(key=lambda item: (item[1].top1 / item[1].count, item[1].top5 / item[1].count, -item[1].count))
        return [
            {
                "wnid": label,
                "name": self.names.get(label, "?"),
                "count": s.count,
                "top1": s.top1 / s.count,
                "top5": s.top5 / s.count,
            }
            for label, s in missed[:n]
        ]
