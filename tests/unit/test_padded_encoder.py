"""The CUDA path's math on CPU: bucket plan + packing + padded SDPA encoder + torch pooling give the
packed encoder's embeddings (the CUDA-only parts, streams and graphs, are tested in test_cuda_path.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from service.router import pooling
from service.router.buckets import BucketGrid
from service.router.cuda_encoder import PAD_TOKEN_ID, pack_chunk
from service.router.embedder import SEQ_ALIGN
from service.router.minilm import MiniLM
from service.router.model_card import default_model_dir
from tests.unit.test_embedder_parity import PROMPTS

MAX_TOKENS = 256


@pytest.fixture(scope="module")
def model() -> MiniLM:
    return MiniLM.from_pretrained(default_model_dir())


@pytest.fixture(scope="module")
def sequences() -> list[list[int]]:
    tokenizer = Tokenizer.from_file(str(default_model_dir() / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    tokenizer.no_padding()  # tokenizer.json pads to 128: rows of real lengths are what make the key mask matter
    return [enc.ids for enc in tokenizer.encode_batch([p.strip() for p in PROMPTS])]


def test_pack_chunk_pads_rows_and_columns() -> None:
    grid = BucketGrid.from_specs("4", "16", seq_align=SEQ_ALIGN, max_rows=4)
    seqs = [[101, 5, 102], [101, 7, 8, 9, 102]]
    (chunk,) = grid.plan([3, 5], graphs=True)
    host = pack_chunk(seqs, np.array([0, 1]), np.array([3, 5]), chunk, pin=False)
    assert host.ids.shape == (4, 16)
    assert host.ids[0, :3].tolist() == seqs[0] and host.ids[1, :5].tolist() == seqs[1]
    assert (host.ids[0, 3:] == PAD_TOKEN_ID).all() and (host.ids[2:] == PAD_TOKEN_ID).all()
    assert host.lengths.tolist() == [3, 5, 1, 1]  # padding rows keep one key: no fully masked attention row


@torch.inference_mode()
def test_padded_buckets_match_the_packed_encoder(model: MiniLM, sequences: list[list[int]]) -> None:
    grid = BucketGrid.from_specs("1,4,8", "16,32,64,128,256", seq_align=SEQ_ALIGN, max_rows=8)
    lengths = np.array([len(s) for s in sequences])
    order = np.argsort(lengths, kind="stable")
    chunks = grid.plan(lengths[order].tolist(), graphs=True)
    assert len({c.seq for c in chunks}) > 1  # the prompts span several sequence buckets
    # and rows shorter than their bucket, so keys are masked inside rows, not only whole padding rows
    assert any(length < c.seq for c in chunks for length in lengths[order[c.start : c.stop]])
    padded = np.empty((len(sequences), model.cfg.hidden_size), dtype=np.float32)
    for c in chunks:
        rows = order[c.start : c.stop]
        host = pack_chunk(sequences, rows, lengths[rows], c, pin=False)
        hidden, mask = model.encode_padded(host.ids, host.lengths)
        padded[rows] = pooling.mean_pool_l2norm(hidden, mask)[: c.rows].numpy()
    packed = np.stack(
        [
            model(torch.tensor(s), torch.arange(len(s)), [(len(s), 1)])[0].numpy()  # one sequence: no padding at all
            for s in sequences
        ]
    )
    np.testing.assert_allclose(padded, packed, atol=2e-5)


def test_torch_pooling_reference() -> None:
    hidden = torch.randn(3, 5, 8, dtype=torch.float16)
    mask = torch.tensor([[1, 1, 0, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    got = pooling.mean_pool_l2norm(hidden, mask)
    assert got.dtype == torch.float32
    for b in range(3):
        mean = hidden[b, mask[b]].double().mean(dim=0)
        torch.testing.assert_close(got[b].double(), mean / mean.norm(), atol=1e-6, rtol=1e-5)


def test_torch_centroid_topk_reference() -> None:
    queries, centroids = torch.randn(6, 16), torch.randn(10, 16)
    scores, ids = pooling.centroid_topk(queries, centroids, 3)
    sims = queries @ centroids.T
    assert torch.equal(ids, sims.argsort(dim=1, descending=True)[:, :3])
    torch.testing.assert_close(scores, sims.gather(1, ids))
