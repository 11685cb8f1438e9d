"""Which padded shape each part of a CUDA batch runs at: pure planning, no torch.

A CUDA graph replays fixed shapes, so the CUDA encoder captures one graph per (batch, seq) bucket of
a small grid and pads each part of a batch up to a bucket. A batch is first sorted by length and split
by sequence bucket (a few long prompts must not pad hundreds of short ones to 256 tokens), then into
chunks of at most the largest batch bucket. A chunk no bucket covers (graphs off, or a length past the
largest sequence bucket) runs eagerly at its own row count, its length rounded up to ``seq_align``.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of the length-sorted batch, run padded to ``[batch, seq]``."""

    start: int
    stop: int
    batch: int
    seq: int
    graphed: bool

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class BucketGrid:
    """``batch_sizes`` x ``seq_lens`` (each ascending, distinct): the shapes graphs are captured for."""

    batch_sizes: tuple[int, ...]
    seq_lens: tuple[int, ...]
    seq_align: int
    max_rows: int  # eager chunks are cut at this many rows too

    def __post_init__(self) -> None:
        for name, sizes in (("batch sizes", self.batch_sizes), ("sequence lengths", self.seq_lens)):
            if any(s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise ValueError(f"CUDA graph {name} must be distinct positive integers, ascending: {sizes}")
        if self.seq_align < 1 or self.max_rows < 1:
            raise ValueError(f"seq_align and max_rows must be positive: {self.seq_align}, {self.max_rows}")

    @classmethod
    def from_specs(
        cls, batch_spec: str, seq_spec: str, *, seq_align: int, max_rows: int, max_seq: int | None = None
    ) -> BucketGrid:
        """From comma-separated settings (``"1,4,16"``); batch sizes above ``max_rows`` are dropped (no batch that
        large is ever formed), sequence lengths are rounded up to ``seq_align`` and those above ``max_seq`` dropped
        (no input is longer after truncation, and one past the model's position table would fault the device)."""
        batch_sizes = sorted({b for b in parse_sizes(batch_spec) if b <= max_rows})
        seq_lens = sorted({round_up(s, seq_align) for s in parse_sizes(seq_spec)})
        if max_seq is not None:
            seq_lens = [s for s in seq_lens if s <= round_up(max_seq, seq_align)]
        return cls(tuple(batch_sizes), tuple(seq_lens), seq_align, max_rows)

    def buckets(self) -> list[tuple[int, int]]:
        """Every (batch, seq) shape to capture, largest first (smaller graphs reuse its memory pool)."""
        return sorted(((b, s) for b in self.batch_sizes for s in self.seq_lens), reverse=True)

    def seq_bucket(self, length: int) -> int | None:
        """The smallest sequence bucket holding ``length`` tokens; None past the largest."""
        i = bisect.bisect_left(self.seq_lens, length)
        return self.seq_lens[i] if i < len(self.seq_lens) else None

    def batch_bucket(self, rows: int) -> int | None:
        """The smallest batch bucket holding ``rows`` sequences; None past the largest."""
        i = bisect.bisect_left(self.batch_sizes, rows)
        return self.batch_sizes[i] if i < len(self.batch_sizes) else None

    def plan(self, sorted_lengths: Sequence[int], *, graphs: bool) -> list[Chunk]:
        """Chunks covering ``sorted_lengths`` (ascending) in order; ``graphs`` False plans eager runs only."""
        chunks: list[Chunk] = []
        start = 0
        total = len(sorted_lengths)
        while start < total:
            bucket = self.seq_bucket(sorted_lengths[start])
            group_stop = start + 1
            while group_stop < total and self.seq_bucket(sorted_lengths[group_stop]) == bucket:
                group_stop += 1
            graphable = graphs and bucket is not None and bool(self.batch_sizes)
            cap = self.batch_sizes[-1] if graphable else self.max_rows
            seq = bucket if bucket is not None else round_up(sorted_lengths[group_stop - 1], self.seq_align)
            for chunk_start in range(start, group_stop, cap):
                rows = min(cap, group_stop - chunk_start)
                padded = self.batch_bucket(rows) if graphable else None
                chunks.append(Chunk(chunk_start, chunk_start + rows, padded or rows, seq, graphed=padded is not None))
            start = group_stop
        return chunks


def parse_sizes(spec: str) -> list[int]:
    """``"1, 4,16"`` -> [1, 4, 16]; an empty string is no sizes."""
    try:
        return [int(part) for part in spec.replace(" ", "").split(",") if part]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {spec!r}") from exc


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
