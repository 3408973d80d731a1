"""Class labels from a synsets file: one `<wnid> <name>` per line, in model-output order."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

IMAGENET_SYNSETS = Path(__file__).parent / "imagenet_synsets.txt"  # ImageNet-1k, in the zoo models' output order


@dataclass(frozen=True)
class Labels:
    wnids: tuple[str, ...]
    names: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.wnids)

    def index_of(self) -> dict[str, int]:
        return {wnid: i for i, wnid in enumerate(self.wnids)}

    @classmethod
    def load(cls, path: str | Path) -> Labels:
        wnids: list[str] = []
        names: list[str] = []
        for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            wnid, _, name = line.strip().partition(" ")
            if not name:
                raise ValueError(f"{path}:{n}: expected '<wnid> <name>', got {line!r}")
            wnids.append(wnid)
            names.append(name.strip())
        return cls(tuple(wnids), tuple(names))
