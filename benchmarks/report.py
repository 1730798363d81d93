"""Timing samples and the printed results every benchmark shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np


@dataclass
class Timings:
    seconds: list[float] = field(default_factory=list)

    def add(self, value: float) -> None:
        self.seconds.append(value)

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.seconds, q)) * 1000

    @property
    def p50_ms(self) -> float:
        return self.percentile_ms(50)

    @property
    def p90_ms(self) -> float:
        return self.percentile_ms(90)


def print_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> None:
    rows = [[f"{v:.1f}" if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    for line in (list(header), *rows):
        print("  ".join(str(cell).ljust(width) for cell, width in zip(line, widths)))


def print_summary(figures: Mapping[str, float]) -> None:
    """The lines `make bench` promises: `name: value`, one per line."""
    for name, value in figures.items():
        print(f"{name}: {value:.3g}" if abs(value) < 1000 else f"{name}: {value:.0f}")
