"""Which padded shape each part of a CUDA batch runs at: pure planning, no torch.

A CUDA graph replays fixed shapes, so the CUDA encoder captures one graph per (batch, seq) bucket of
a small grid and pads each part of a batch up to a bucket. A batch is first sorted by length and split
by sequence bucket (a few long prompts must not pad hundreds of short ones to 256 tokens), then into
chunks of at most the largest batch bucket. A chunk no bucket covers (graphs off, or a length past the
largest sequence bucket) runs eagerly at its own row count, its length rounded up to ``seq_align``.

A chunk between two batch buckets either pads up to the larger one or runs as several replays (600 rows
as 512 + 64 + 64 instead of 1024): whichever costs least, counting each replay as ``LAUNCH_COST_TOKENS``
tokens of work on top of its padded rows.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

# What one graph replay costs beyond its rows, in tokens of work: its ~70 kernels run one after another and
# each takes a few microseconds however small its input. Estimated (an H100 runs about 2k MiniLM tokens in
# fp16 in that time), not measured yet: a replay of a 64 x 32 bucket counts double its rows.
LAUNCH_COST_TOKENS = 2048


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
    _first_replays: dict[int, list[int]] = field(init=False, repr=False, compare=False)  # per seq bucket

    def __post_init__(self) -> None:
        for name, sizes in (("batch sizes", self.batch_sizes), ("sequence lengths", self.seq_lens)):
            if any(s < 1 for s in sizes) or list(sizes) != sorted(set(sizes)):
                raise ValueError(f"CUDA graph {name} must be distinct positive integers, ascending: {sizes}")
        if self.seq_align < 1 or self.max_rows < 1:
            raise ValueError(f"seq_align and max_rows must be positive: {self.seq_align}, {self.max_rows}")
        firsts = {seq: cheapest_first_replays(self.batch_sizes, LAUNCH_COST_TOKENS / seq) for seq in self.seq_lens}
        object.__setattr__(self, "_first_replays", firsts)  # frozen: planned once, read per batch

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
                if not graphable:
                    chunks.append(Chunk(chunk_start, chunk_start + rows, rows, seq, graphed=False))
                    continue
                at, stop = chunk_start, chunk_start + rows
                for batch in split_of(self._first_replays[seq], rows):  # largest first; only the last one pads
                    take = min(batch, stop - at)
                    chunks.append(Chunk(at, at + take, batch, seq, graphed=True))
                    at += take
            start = group_stop
        return chunks


def cheapest_first_replays(batch_sizes: Sequence[int], launch_rows: float) -> list[int]:
    """For each row count up to the largest batch size, the first (largest) replay of the batch sizes that hold that
    many rows at the least cost: the rows they pad to, plus ``launch_rows`` per replay. The others are the split of
    what it leaves (``split_of``): one number a row count, where whole splits took O(rows^2) on a sparse grid."""
    if not batch_sizes:
        return []
    largest_first = sorted(batch_sizes, reverse=True)  # on a tie the larger one wins: fewer replays
    cost = [0.0] * (batch_sizes[-1] + 1)
    first = [0] * len(cost)
    for rows in range(1, len(cost)):
        best = math.inf
        for batch in largest_first:
            candidate = batch + launch_rows + cost[max(0, rows - batch)]
            if candidate < best:
                best, first[rows] = candidate, batch
        cost[rows] = best
    return first


def split_of(first_replays: Sequence[int], rows: int) -> tuple[int, ...]:
    """The batch sizes, largest first, that ``cheapest_first_replays`` chose for ``rows``. Dropping any one of them
    leaves rows uncovered (it would cost less otherwise), so every replay but the last runs full."""
    parts = []
    while rows > 0:
        parts.append(first_replays[rows])
        rows -= first_replays[rows]
    return tuple(sorted(parts, reverse=True))


def parse_sizes(spec: str) -> list[int]:
    """``"1, 4,16"`` -> [1, 4, 16]; an empty string is no sizes."""
    try:
        return [int(part) for part in spec.replace(" ", "").split(",") if part]
    except ValueError as exc:
        raise ValueError(f"expected comma-separated integers, got {spec!r}") from exc


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple
