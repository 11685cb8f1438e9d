"""End-to-end: fit on a slice of the shared data, add a model, evaluate, and serve the result.

The real commands in subprocesses (``python -m service fit | add-model | eval | serve-router``) with
the real embedder; K = 8 on a few hundred rows, since this checks the plumbing, not the quality.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.router.weights import load_weights
from tests.e2e.conftest import REPO, start_server

SHARED_DATA = REPO.parent / "shared" / "data" / "routerbench"
TRAIN_FILES = ("arc_challenge_train.csv", "mbpp_train.csv", "winograde_train.csv")
TRAIN_ROWS = 40  # per file
VALIDATION_ROWS = 20  # per file, after the training rows
ADDED = "gpt-4-1106-preview"
CLUSTERS = 8
COMMAND_TIMEOUT_S = 300

pytestmark = pytest.mark.slow


def _slice(source: Path, target: Path, rows: range, drop_model: str | None) -> Path:
    """Rows ``rows`` of a RouterBench CSV, without ``drop_model``'s columns."""
    with source.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        header = [c for c in reader.fieldnames or [] if drop_model is None or not c.startswith(drop_model)]
        kept = [row for i, row in enumerate(reader) if i in rows]
    with target.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
    return target


def _service(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "service", *args, "--no-progress"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT_S,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_fit_add_model_eval_and_serve(tmp_path: Path) -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    prices = str(SHARED_DATA / "prices.json")
    train = [_slice(SHARED_DATA / n, tmp_path / f"train-{n}", range(TRAIN_ROWS), ADDED) for n in TRAIN_FILES]
    held = range(TRAIN_ROWS, TRAIN_ROWS + VALIDATION_ROWS)
    validation = [_slice(SHARED_DATA / n, tmp_path / f"val-{n}", held, None) for n in TRAIN_FILES]

    fitted = tmp_path / "fitted.safetensors"
    _service("fit", "--data", *map(str, train), "--prices", prices, "--clusters", str(CLUSTERS), "--restarts", "2",
             "--out", str(fitted))  # fmt: skip
    base = load_weights(fitted)
    assert ADDED not in base.models
    assert base.num_clusters == CLUSTERS
    assert base.metadata["fit"]["prior"] == "task"

    extended_path = tmp_path / "extended.safetensors"
    out = _service("add-model", "--weights", str(fitted), "--data", *map(str, validation), "--prices", prices,
                   "--model", ADDED, "--out", str(extended_path))  # fmt: skip
    extended = load_weights(extended_path)
    assert extended.version in out
    assert extended.models == (*base.models, ADDED)
    np.testing.assert_array_equal(extended.centroids, base.centroids)
    np.testing.assert_array_equal(extended.expected_error[:-1], base.expected_error)
    # Blended list prices: gpt-4 0.015 USD per 1k over claude-v1/v2's 0.012, the dearest when fitting.
    assert float(extended.cost_per_1k[-1]) == pytest.approx(0.015 / 0.012)

    prefix = tmp_path / "quality"
    _service("eval", "--weights", str(extended_path), "--data", *map(str, validation), "--prices", prices,
             "--out", str(prefix))  # fmt: skip
    report = json.loads(prefix.with_suffix(".json").read_text())
    assert report["weights"]["version"] == extended.version
    assert report["evaluation"]["reference_model"] in extended.models
    router = report["pooled"]["router"]
    assert 0.0 < router["audc"] <= report["pooled"]["oracle"]["audc"]
    assert prefix.with_suffix(".png").stat().st_size > 0

    server = start_server(tmp_path, "--weights", str(extended_path))
    try:
        answer = httpx.post(
            f"{server.url}/v1/route", json={"prompt": "Which gas do plants absorb?", "cost_weight": 0.0}, timeout=30
        )
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["weights_version"] == extended.version
        assert 0 <= body["cluster_id"] < CLUSTERS
        assert set(body["all_scores"]) == set(extended.models)
        errors = extended.expected_error[:, body["cluster_id"]]
        assert body["expected_error"] == pytest.approx(float(errors[extended.models.index(body["selected_model"])]))
        assert body["expected_error"] == pytest.approx(float(errors.min()))
    finally:
        assert server.stop() == 0, server.log()
