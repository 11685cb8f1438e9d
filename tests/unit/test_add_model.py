"""add-model: a new model appended from a small validation set, with nothing else touched."""

from __future__ import annotations

import argparse
import csv
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from service.router.offline import add_model, fit
from service.router.offline.costs import COST_UNIT_ROWS
from service.router.offline.data import LabelledSet
from service.router.offline.estimate import TASK_PRIOR_STRENGTH
from service.router.offline.options import add_add_model_arguments
from service.router.scoring import ScoreTable, score_batch
from service.router.weights import RouterWeights, load_weights, save_weights

K, DIM = 4, 8
EMBEDDER_SHA = "ab" * 32


def _centroids() -> np.ndarray:
    return np.eye(K, DIM, dtype=np.float32)  # cluster c = basis vector c


def toy_weights() -> RouterWeights:
    rng = np.random.default_rng(0)
    models = ("m-cheap", "m-mid", "m-dear")
    blended = {"m-cheap": 0.001, "m-mid": 0.004, "m-dear": 0.01}
    return RouterWeights(
        models=models,
        centroids=_centroids(),
        expected_error=rng.uniform(0.1, 0.6, size=(3, K)).astype(np.float32),
        cost_per_1k=np.array([0.1, 0.4, 1.0], dtype=np.float32),
        default_lambda=0.1,
        embedder_id="toy",
        embedder_sha256=EMBEDDER_SHA,
        metadata={
            "cost_unit": fit.COST_UNIT,
            "cost_blend": {"input_weight": 3.0, "output_weight": 1.0},
            "price_usd_per_1k": {m: {"input": b, "output": b, "blended": b} for m, b in blended.items()},
            "fit": {
                "alpha": 2.0,
                "text_mode": "last_block",
                "cluster_task_counts": {"a": [3, 1, 0, 0], "b": [1, 3, 0, 4]},
            },
        },
    )


def _embeddings(clusters: Sequence[int]) -> np.ndarray:
    return _centroids()[list(clusters)]


def test_new_model_errors_with_the_global_prior() -> None:
    weights = toy_weights()
    # No task names: prior = the new model's overall error, 2 wrong of 5 = 0.4; alpha = 2.
    clusters = [0, 0, 1, 1, 1]
    correct = np.array([1.0, 0.0, 1.0, 1.0, 0.0])
    errors = add_model.new_model_errors(weights, _embeddings(clusters), correct, [""] * 5, alpha=2.0)
    assert errors.dtype == np.float32
    np.testing.assert_allclose(errors, [(1 + 0.8) / 4, (1 + 0.8) / 5, 0.4, 0.4], rtol=1e-6)


def test_new_model_errors_with_the_task_prior() -> None:
    weights = toy_weights()
    # Task a: 2 rows, both right; task b: 2 rows, both wrong -> overall 0.5; rates shrunk by s pseudo-rows.
    s = TASK_PRIOR_STRENGTH
    rate_a, rate_b = (0 + s * 0.5) / (2 + s), (2 + s * 0.5) / (2 + s)
    clusters, tasks, correct = [0, 0, 3, 3], ["a", "a", "b", "b"], np.array([1.0, 1.0, 0.0, 0.0])
    errors = add_model.new_model_errors(weights, _embeddings(clusters), correct, tasks, alpha=2.0)
    prior = [0.75 * rate_a + 0.25 * rate_b, 0.25 * rate_a + 0.75 * rate_b, 0.5, rate_b]  # cluster 2: no training rows
    expected = [(0 + 2 * prior[0]) / (2 + 2), prior[1], prior[2], (2 + 2 * prior[3]) / (2 + 2)]
    np.testing.assert_allclose(errors, expected, rtol=1e-6)


def test_weights_fitted_on_the_global_prior_give_the_new_model_the_global_prior() -> None:
    """fit records the task counts whatever the prior: they alone made add-model use the task mix for a model
    appended to weights whose other models were all shrunk toward their global rate."""
    weights = toy_weights()
    fitted = weights.metadata["fit"]
    assert isinstance(fitted, dict)
    weights = replace(weights, metadata={**weights.metadata, "fit": {**fitted, "prior": "global"}})
    clusters, tasks, correct = [0, 0, 3, 3], ["a", "a", "b", "b"], np.array([1.0, 1.0, 0.0, 0.0])
    errors = add_model.new_model_errors(weights, _embeddings(clusters), correct, tasks, alpha=2.0)
    g = 0.5  # 2 wrong of 4
    np.testing.assert_allclose(errors, [(0 + 2 * g) / (2 + 2), g, g, (2 + 2 * g) / (2 + 2)], rtol=1e-6)


def test_task_prior_uses_only_known_task_rows_with_an_outcome() -> None:
    # The only row naming a known task ("a") has no outcome; the others name a task the weights never saw.
    # This failed with "models at columns [0] have no observed outcomes"; now the prior is the global rate.
    weights = toy_weights()
    clusters, tasks = [0, 1, 1, 2], ["a", "new-task", "new-task", "new-task"]
    correct = np.array([np.nan, 1.0, 1.0, 0.0])  # global error 1/3
    errors = add_model.new_model_errors(weights, _embeddings(clusters), correct, tasks, alpha=2.0)
    g = 1 / 3
    np.testing.assert_allclose(errors, [g, (0 + 2 * g) / (2 + 2), (1 + 2 * g) / (1 + 2), g], rtol=1e-6)


def test_append_leaves_old_models_and_their_routing_unchanged() -> None:
    weights = toy_weights()
    new_errors = np.array([0.0, 0.9, 0.05, 0.3], dtype=np.float32)
    extended = add_model.append_model(weights, "m-new", new_errors, 0.05, {"note": "test"})
    assert extended.models == (*weights.models, "m-new")
    np.testing.assert_array_equal(extended.centroids, weights.centroids)
    np.testing.assert_array_equal(extended.expected_error[:3], weights.expected_error)
    np.testing.assert_array_equal(extended.expected_error[3], new_errors)
    np.testing.assert_array_equal(extended.cost_per_1k[:3], weights.cost_per_1k)
    assert extended.metadata["added_models"] == [{"model": "m-new", "note": "test"}]
    assert "added_models" not in weights.metadata
    assert extended.version != weights.version

    old = ScoreTable.build(weights.models, weights.expected_error, weights.cost_per_1k)
    new = ScoreTable.build(extended.models, extended.expected_error, extended.cost_per_1k)
    old_only = np.array([m in weights.models for m in new.models])
    clusters = np.repeat(np.arange(K), 6)
    lambdas = np.tile([0.0, 0.05, 0.1, 0.3, 1.0, 5.0], K)
    before = score_batch(old, clusters, lambdas, np.ones((len(clusters), 3), dtype=bool))
    after = score_batch(new, clusters, lambdas, np.tile(old_only, (len(clusters), 1)))
    assert [old.models[c] for c in before.chosen] == [new.models[c] for c in after.chosen]
    # With the new model allowed it does win somewhere (cluster 0 at lambda 0: error 0).
    everything = score_batch(new, np.array([0]), np.array([0.0]), np.ones((1, 4), dtype=bool))
    assert new.models[int(everything.chosen[0])] == "m-new"


def test_append_rejects_duplicates_and_bad_values() -> None:
    weights = toy_weights()
    with pytest.raises(ValueError, match="already in the weights"):
        add_model.append_model(weights, "m-mid", np.zeros(K), 0.1, {})
    with pytest.raises(ValueError, match="errors must be"):
        add_model.append_model(weights, "m-new", np.zeros(K + 1), 0.1, {})
    with pytest.raises(ValueError, match="cost must be"):
        add_model.append_model(weights, "m-new", np.zeros(K), -1.0, {})


def test_usd_prices_convert_like_fit_did() -> None:
    weights = toy_weights()
    # Reference: blended 0.01 USD is cost 1.0; (3 * 0.002 + 0.006) / 4 = 0.003 -> 0.3.
    assert add_model.reference_price(weights) == pytest.approx(0.01)
    assert add_model.relative_cost_from_prices(weights, 0.002, 0.006) == pytest.approx(0.3)


def _write_validation(path: Path, rows: list[tuple[str, str, str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "eval_name", "m-new"])
        writer.writerows(rows)
    return path


def test_observed_costs_are_compared_on_the_same_rows() -> None:
    """For weights fitted with --costs rows: long prompts cost every model more. Against the weights' training means
    (from other prompts) the new model looked dearer than it is; against a known model on the same rows it does not."""
    weights = replace(toy_weights(), metadata={"cost_unit": COST_UNIT_ROWS})  # m-cheap 0.1, m-mid 0.4, m-dear 1.0
    mid = np.array([0.5, 0.7, np.nan, 0.9])  # USD per call on long prompts: ten times the training mean, say
    new = np.array([1.0, 1.4, 3.0, np.nan])  # twice m-mid wherever both are observed
    cheap = np.array([0.1, np.nan, np.nan, np.nan])  # costed beside the new model on one row only
    labelled = LabelledSet(
        texts=["a", "b", "c", "d"], task=["t"] * 4, sample_ids=["1", "2", "3", "4"],
        models=("m-cheap", "m-mid", "m-new"), correct=np.ones((4, 3), dtype=np.float32),
        cost_usd=np.stack([cheap, mid, new], axis=1), sources=(), text_mode="full",
    )  # fmt: skip
    # against m-mid (two shared rows), not m-cheap (one, which would say 1.0)
    assert add_model.relative_cost_from_rows(weights, labelled, 2) == pytest.approx(0.8)
    unrelated = replace(labelled, models=("m-new", "other", "x"))  # no model of the weights costed in the data
    with pytest.raises(ValueError, match="give --cost-per-1k"):
        add_model.relative_cost_from_rows(weights, unrelated, 0)
    with pytest.raises(ValueError, match="list prices"):
        add_model.relative_cost_from_rows(toy_weights(), labelled, 2)


def test_add_model_main_writes_extended_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    source = tmp_path / "w.safetensors"
    save_weights(toy_weights(), source)
    data = _write_validation(tmp_path / "val.csv", [("c0", "a", "1"), ("c0", "a", "0"), ("c3", "b", "0")])
    (tmp_path / "prices.json").write_text(json.dumps({"m-new": {"input": 0.002, "output": 0.006}}), encoding="utf-8")

    def fake_embed(texts: Sequence[str], **_: object) -> tuple[np.ndarray, str, str]:
        return _embeddings([int(t[1:]) for t in texts]), "toy", EMBEDDER_SHA

    monkeypatch.setattr(fit, "embed_prompts", fake_embed)
    parser = argparse.ArgumentParser()
    add_add_model_arguments(parser)
    out = tmp_path / "w2.safetensors"
    args = parser.parse_args(["--data", str(data), "--model", "m-new", "--weights", str(source), "--out", str(out)])
    assert add_model.add_model_main(args) == 0
    extended = load_weights(out)
    assert extended.models[-1] == "m-new"
    assert float(extended.cost_per_1k[-1]) == pytest.approx(0.3)
    info = extended.metadata["added_models"][0]
    assert info["outcomes_observed"] == 3
    assert info["alpha"] == 2.0
    assert info["cost"] == "from prices.json"
    assert extended.version in capsys.readouterr().out

    monkeypatch.setattr(fit, "embed_prompts", None)  # a model already in the weights is refused before embedding
    again = parser.parse_args(["--data", str(data), "--model", "m-new", "--weights", str(out), "--out", str(out)])
    assert add_model.add_model_main(again) == 1
    assert "already in the weights" in capsys.readouterr().err
    monkeypatch.setattr(fit, "embed_prompts", fake_embed)
    other = parser.parse_args(["--data", str(data), "--model", "m-other", "--weights", str(source), "--out", str(out)])
    assert add_model.add_model_main(other) == 1
    assert "priced: m-other" in capsys.readouterr().err
    # a new model whose column is empty on every row: "models at columns [0] have no observed outcomes" before
    empty = _write_validation(tmp_path / "empty.csv", [("c0", "a", ""), ("c3", "b", "")])
    blank = parser.parse_args(["--data", str(empty), "--model", "m-new", "--weights", str(source), "--out", str(out)])
    assert add_model.add_model_main(blank) == 1
    assert "empty.csv: no outcome for model(s) 'm-new' in any of the 2 rows" in capsys.readouterr().err


# Weights from elsewhere pass validation with any JSON metadata; each of these used to end in a traceback
# (AttributeError, TypeError, KeyError) or a message about array shapes.
MALFORMED_METADATA: list[tuple[str, dict[str, object], str]] = [
    ("fit-not-an-object", {"fit": "oops"}, "metadata 'fit' must be a JSON object"),
    ("alpha-null", {"fit": {"alpha": None}}, "fit.alpha must be a number"),
    ("task-counts-a-list", {"fit": {"alpha": 2.0, "cluster_task_counts": ["a", "b"]}}, "cluster_task_counts"),
    ("task-counts-too-short", {"fit": {"alpha": 2.0, "cluster_task_counts": {"a": [1], "b": [2]}}}, "4 counts"),
    ("price-without-blended", {"price_usd_per_1k": {"m-cheap": {"input": 1}}}, "m-cheap.blended"),
    ("added-models-not-a-list", {"added_models": {"m": 1}}, "'added_models' must be a JSON list"),
]


@pytest.mark.parametrize(("override", "message"), [pytest.param(o, m, id=name) for name, o, m in MALFORMED_METADATA])
def test_add_model_main_reports_malformed_weights_metadata(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    override: dict[str, object],
    message: str,
) -> None:
    weights = toy_weights()
    source = tmp_path / "w.safetensors"
    save_weights(replace(weights, metadata={**weights.metadata, **override}), source)
    data = _write_validation(tmp_path / "val.csv", [("c0", "a", "1"), ("c0", "a", "0"), ("c3", "b", "0")])

    def fake_embed(texts: Sequence[str], **_: object) -> tuple[np.ndarray, str, str]:
        return _embeddings([int(t[1:]) for t in texts]), "toy", EMBEDDER_SHA

    monkeypatch.setattr(fit, "embed_prompts", fake_embed)
    parser = argparse.ArgumentParser()
    add_add_model_arguments(parser)
    argv = ["--data", str(data), "--model", "m-new", "--weights", str(source), "--out", str(tmp_path / "w2.st")]
    assert add_model.add_model_main(parser.parse_args([*argv, "--price-usd", "0.002", "0.006"])) == 1
    err = capsys.readouterr().err
    assert err.startswith("add-model failed: ")
    assert message in err
    assert not (tmp_path / "w2.st").exists()
