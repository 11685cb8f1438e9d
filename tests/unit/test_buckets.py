"""CUDA-graph bucket planning: pure functions, run everywhere."""

from __future__ import annotations

import pytest

from service.router.buckets import BucketGrid, Chunk, cheapest_first_replays, parse_sizes, round_up, split_of


def grid(batch: str = "1,4,16,64", seq: str = "16,32,64", *, max_rows: int = 64) -> BucketGrid:
    return BucketGrid.from_specs(batch, seq, seq_align=16, max_rows=max_rows)


def test_specs_are_parsed_sorted_aligned_and_capped() -> None:
    g = BucketGrid.from_specs("64, 1,16,4,1024", "40,16,32", seq_align=16, max_rows=256)
    assert g.batch_sizes == (1, 4, 16, 64)  # 1024 > max_rows: never formed, never captured
    assert g.seq_lens == (16, 32, 48)  # 40 rounded up to the alignment
    assert g.buckets()[0] == (64, 48)  # largest first
    assert len(g.buckets()) == 12
    assert parse_sizes("") == []
    with pytest.raises(ValueError, match="comma-separated"):
        parse_sizes("1,x")
    with pytest.raises(ValueError, match="ascending"):
        BucketGrid((4, 1), (16,), 16, 8)


def test_sequence_lengths_past_the_models_limit_are_dropped() -> None:
    # a bucket past the position table (512 for MiniLM) indexed out of range on the device during warm-up
    g = BucketGrid.from_specs("1", "16,256,512,1024", seq_align=16, max_rows=8, max_seq=256)
    assert g.seq_lens == (16, 256)


def test_smallest_covering_bucket() -> None:
    g = grid()
    assert [g.seq_bucket(n) for n in (1, 16, 17, 64, 65)] == [16, 16, 32, 64, None]
    assert [g.batch_bucket(n) for n in (1, 2, 4, 5, 64, 65)] == [1, 4, 4, 16, 64, None]
    assert round_up(17, 16) == 32 and round_up(16, 16) == 16


def test_batch_is_split_by_sequence_bucket_and_padded_to_batch_buckets() -> None:
    lengths = [5] * 3 + [20] * 5 + [60]
    assert grid().plan(lengths, graphs=True) == [
        Chunk(0, 3, 4, 16, True),
        Chunk(3, 8, 16, 32, True),
        Chunk(8, 9, 1, 64, True),
    ]


def test_groups_larger_than_the_largest_batch_bucket_are_cut() -> None:
    chunks = grid().plan([10] * 70, graphs=True)
    assert [(c.rows, c.batch, c.graphed) for c in chunks] == [(64, 64, True), (6, 16, True)]
    assert chunks[-1].stop == 70


def test_lengths_past_the_largest_bucket_run_eagerly_aligned() -> None:
    chunks = grid().plan([10, 70, 100], graphs=True)
    assert chunks == [Chunk(0, 1, 1, 16, True), Chunk(1, 3, 2, 112, False)]


def test_graphs_off_plans_eager_chunks_at_their_own_row_count() -> None:
    chunks = grid(max_rows=8).plan([3] * 10 + [30] * 2, graphs=False)
    assert chunks == [Chunk(0, 8, 8, 16, False), Chunk(8, 10, 2, 16, False), Chunk(10, 12, 2, 32, False)]
    assert grid().plan([], graphs=True) == []


def test_a_chunk_between_buckets_runs_as_the_cheapest_set_of_replays() -> None:
    """600 rows at 32 tokens padded to the 1024 bucket: 424 rows of work for nothing (70 %). Split 512 + 64 + 64
    they pad 40 rows, for two more replays."""
    g = BucketGrid.from_specs("1,4,16,64,256,512,1024", "16,32", seq_align=16, max_rows=1024)
    chunks = g.plan([20] * 600, graphs=True)
    assert [(c.start, c.stop, c.batch, c.graphed) for c in chunks] == [
        (0, 512, 512, True),
        (512, 576, 64, True),
        (576, 600, 64, True),
    ]
    # a few rows past a small bucket still pad up (a replay costs more than the padding), past a large one they split
    assert [(c.rows, c.batch) for c in g.plan([20] * 17, graphs=True)] == [(17, 64)]
    assert [(c.rows, c.batch) for c in g.plan([20] * 70, graphs=True)] == [(64, 64), (6, 16)]
    assert [(c.rows, c.batch) for c in g.plan([20] * 1024, graphs=True)] == [(1024, 1024)]


def test_cheapest_splits_cover_every_row_count_and_never_cost_more_than_padding_up() -> None:
    sizes, launch_rows = (1, 4, 16, 64, 256), 64.0
    firsts = cheapest_first_replays(sizes, launch_rows)
    for rows in range(1, sizes[-1] + 1):
        split = split_of(firsts, rows)
        assert list(split) == sorted(split, reverse=True) and sum(split) >= rows
        assert sum(split[:-1]) < rows  # every replay but the last is full
        padded_up = min(b for b in sizes if b >= rows)
        assert sum(split) + launch_rows * len(split) <= padded_up + launch_rows
    assert split_of(firsts, 1) == (1,) and split_of(firsts, 256) == (256,) and cheapest_first_replays((), 1.0) == []
    # a sparse grid: one number a row count (whole splits took 4 s and 1.1 GB for 1,65536)
    sparse = cheapest_first_replays((1, 65536), 64.0)
    assert len(sparse) == 65537 and split_of(sparse, 100) == (1,) * 100 and split_of(sparse, 2000) == (65536,)
