"""Cross-validation and scoring of weights (quality.py), their reports, and the ``eval`` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.digest import file_sha256
from service.router.offline import costs, estimate, fit, quality
from service.router.offline.baselines import ORACLE, RANDOM_MIX, SINGLE_ENVELOPE
from service.router.offline.data import LabelledSet, load_labelled
from service.router.offline.eval_cli import eval_main
from service.router.offline.options import add_eval_arguments, add_fit_arguments
from service.router.offline.quality_report import report_markdown
from service.router.scoring import ScoreTable
from service.router.weights import RouterWeights, save_weights

MODELS = ("cheap", "dear", "mid")
PRICES = {"cheap": (0.001, 0.001), "dear": (0.01, 0.01), "mid": (0.004, 0.004)}
BLOBS, PER_BLOB, DIM = 4, 30, 16


def _blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(BLOBS, DIM))
    points = np.repeat(centres, PER_BLOB, axis=0) + 0.1 * rng.normal(size=(BLOBS * PER_BLOB, DIM))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32), np.repeat(
        np.arange(BLOBS), PER_BLOB
    )


def _labelled(seed: int = 0) -> tuple[LabelledSet, np.ndarray]:
    """cheap is right on blobs 0-1 only, mid on 0-2, dear on 90 % of everything; tasks = blob parity."""
    x, blob = _blobs(seed)
    rng = np.random.default_rng(seed + 1)
    n = len(blob)
    correct = np.stack([blob < 2, rng.uniform(size=n) < 0.9, blob < 3], axis=1).astype(np.float32)
    correct[0, 1] = np.nan  # one missing outcome: trained on per model, left out of scoring
    cost = np.tile([0.001, 0.01, 0.004], (n, 1))
    labelled = LabelledSet(
        texts=[f"b{b}" for b in blob],
        task=[f"task{b % 2}" for b in blob],
        sample_ids=[str(i) for i in range(n)],
        models=MODELS,
        correct=correct,
        cost_usd=cost,
        sources=(),
        text_mode="last_block",
    )
    return labelled, x


def test_cross_validate_compares_every_system_on_the_same_folds() -> None:
    labelled, x = _labelled()
    route = costs.relative_costs(costs.blended_prices(MODELS, PRICES))
    settings = quality.FitSettings(k=BLOBS, n_restarts=1)
    report = quality.cross_validate(labelled, x, labelled.cost_usd, route_cost=route, folds=3, settings=settings)
    expected = [quality.ROUTER, quality.GLOBAL_SHRINK, quality.PLAIN, quality.TASK_NAME, ORACLE, RANDOM_MIX]
    assert list(report.metrics)[:6] == expected
    assert set(report.metrics) == {*expected, SINGLE_ENVELOPE, *MODELS}
    assert all(len(folds) == 3 for folds in report.metrics.values())
    assert [f["fold"] for f in report.fold_info] == [0, 1, 2]
    assert report.info["rows_scored"] == BLOBS * PER_BLOB - 1
    assert report.info["reference_model"] == "dear"
    assert report.kinds[quality.ROUTER] == "router"
    assert report.kinds["cheap"] == "single"
    router = np.mean([m.audc for m in report.metrics[quality.ROUTER]])
    oracle = np.mean([m.audc for m in report.metrics[ORACLE]])
    mix = np.mean([m.audc for m in report.metrics[RANDOM_MIX]])
    # Clusters are the blobs, so the router finds where the cheap models are right: near the oracle.
    assert mix < router <= oracle + 1e-12
    assert router > oracle - 0.05
    assert set(report.pooled) == set(report.metrics)
    table = quality.metric_table(report.metrics)
    assert table[ORACLE]["audc"]["n"] == 3
    diff = quality.paired_difference(report, quality.ROUTER, quality.PLAIN)
    assert diff is not None
    assert diff["n"] == 3
    markdown = report_markdown(report, "title", ["preamble"])
    assert "| router |" in markdown
    assert "Router minus plain k-means" in markdown


def test_the_global_rate_baseline_chooses_alpha_as_the_router_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """The baseline differs from the router in its prior alone: it took alpha by log-loss whatever the router's
    criterion, and ignored a given alpha."""
    labelled, x = _labelled()
    route = costs.relative_costs(costs.blended_prices(MODELS, PRICES))
    given = quality.FitSettings(k=BLOBS, n_restarts=1, alpha=3.0)
    report = quality.cross_validate(labelled, x, labelled.cost_usd, route_cost=route, folds=3, settings=given)
    assert [f["global_shrink_alpha"] for f in report.fold_info] == [3.0, 3.0, 3.0]
    criteria: list[bool] = []
    real = quality.select_alpha

    def spy(*args: Any, **kwargs: Any) -> Any:
        criteria.append(kwargs.get("costs") is not None)  # AUDC needs costs; log-loss is chosen without them
        return real(*args, **kwargs)

    monkeypatch.setattr(quality, "select_alpha", spy)
    for criterion in ("audc", "log-loss"):
        criteria.clear()
        settings = quality.FitSettings(k=BLOBS, n_restarts=1, alpha_criterion=criterion)
        quality.cross_validate(labelled, x, labelled.cost_usd, route_cost=route, folds=2, settings=settings)
        assert criteria == [criterion == "audc"] * 2, criterion  # once per fold, for the baseline


def test_cross_validate_names_a_fold_it_cannot_score() -> None:
    labelled, x = _labelled()
    sparse = labelled.correct.copy()
    sparse[:, 1] = np.nan
    sparse[:3, 1] = 1.0  # "dear" has 3 outcomes: with 5 folds at least two folds hold none of them out
    realised = labelled.cost_usd
    with pytest.raises(ValueError, match=r"fold \d of 5: none of its \d+ held-out prompts has an outcome and a cost"):
        quality.cross_validate(
            replace(labelled, correct=sparse), x, realised, route_cost=None, folds=5, settings=quality.FitSettings(k=2)
        )
    sparse[:, 1] = np.nan
    sparse[fold_rows := estimate.fold_assignment(len(sparse), 3, 0) == 0, 1] = 1.0  # only fold 1's rows
    with pytest.raises(ValueError, match=r"fold 1 of 3: its training rows have no outcome of 'dear' \(\d+ outcomes\)"):
        quality.cross_validate(
            replace(labelled, correct=sparse), x, realised, route_cost=None, folds=3, settings=quality.FitSettings(k=2)
        )
    assert fold_rows.any()


def test_eval_main_names_the_weights_models_the_data_lacks_before_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "test.jsonl"
    rows = [{"prompt": f"b{i}", "gpt-4-1106-preview": i % 2, "gpt-4-1106-preview|total_cost": 0.01} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    monkeypatch.setattr(fit, "embed_prompts", None)  # it said so only after the minutes of embedding
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    assert eval_main(parser.parse_args(["--data", str(path), "--out", str(tmp_path / "q"), "--no-progress"])) == 1
    err = capsys.readouterr().err
    assert "test.jsonl: no outcome column for model(s) " in err
    assert "'claude-instant-v1'" in err  # one of the shipped weights' models
    assert "'gpt-4-1106-preview'" not in err


def test_eval_main_names_a_model_without_any_outcome(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"b{i % 4}", "cheap": i % 2, "dear": None, "mid": 1} for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    (tmp_path / "prices.json").write_text(
        json.dumps({m: {"input": p[0], "output": p[1]} for m, p in PRICES.items()}), encoding="utf-8"
    )
    monkeypatch.setattr(fit, "embed_prompts", _fake_embed)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    argv = ["--data", str(path), "--cv", "2", "--clusters", "2", "--out", str(tmp_path / "q"), "--no-progress"]
    assert eval_main(parser.parse_args(argv)) == 1  # "no prompts to evaluate on" before
    assert "train.jsonl: no outcome for model(s) 'dear' in any of the 12 rows" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--cv", "1"], "--cv K needs 2 <= K <= the number of prompts (120); got 1"),
        (["--cv", "121"], "--cv K needs 2 <= K <= the number of prompts (120); got 121"),
        (["--cv", "-2"], "--cv K needs 2 <= K <= the number of prompts (120); got -2"),
        # 7 folds of 120 rows: the largest holds out 18, so a fold may train on 102 rows only
        (["--cv", "7", "--clusters", "103"], "--clusters 103 needs at least 103 prompts to fit on; the smallest"),
    ],
)
def test_eval_main_checks_cv_sizes_before_embedding(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    flags: list[str],
    message: str,
) -> None:
    data = _write_data(tmp_path)

    def no_embedding(*_: object, **__: object) -> None:
        raise AssertionError("embedded before checking the sizes")

    monkeypatch.setattr(fit, "embed_prompts", no_embedding)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    argv = ["--data", str(data), "--out", str(tmp_path / "q"), "--no-progress", *flags]
    assert eval_main(parser.parse_args(argv)) == 1
    assert message in capsys.readouterr().err


def test_summarise_spread_and_infinite_folds() -> None:
    assert quality.summarise([0.8, 0.9, 1.0]) == {
        "mean": pytest.approx(0.9),
        "std": pytest.approx(0.1),
        "min": 0.8,
        "max": 1.0,
        "finite": 3,
        "n": 3,
    }
    partial = quality.summarise([0.5, float("inf")])
    assert partial["mean"] is None
    assert partial["finite"] == 1
    assert partial["max"] == 0.5


def test_fold_assignment_is_seeded_and_balanced() -> None:
    folds = estimate.fold_assignment(11, 3, seed=4)
    assert sorted(np.bincount(folds).tolist()) == [3, 4, 4]
    np.testing.assert_array_equal(folds, estimate.fold_assignment(11, 3, seed=4))
    with pytest.raises(ValueError, match="folds"):
        estimate.fold_assignment(2, 3, seed=0)


def test_evaluate_weights_beats_the_single_models_on_its_training_data() -> None:
    labelled, x = _labelled()
    weights = fit.fit_weights(
        labelled, x, prices=PRICES, embedder_id="toy", embedder_sha256="0" * 64, k=BLOBS, n_restarts=1
    )
    report = quality.evaluate_weights(weights, labelled, x, labelled.cost_usd)
    assert report.folds == 0
    assert all(len(m) == 1 for m in report.metrics.values())
    # In-sample, on blob clusters: at a tenth of dear's cost the router already routes blobs 0-2 well.
    assert report.pooled[quality.ROUTER].audc > report.pooled[SINGLE_ENVELOPE].audc
    with pytest.raises(ValueError, match="no outcomes for the weights' model"):
        quality.evaluate_weights(weights, _without_model(labelled, "mid"), x, labelled.cost_usd[:, :2])


def test_evaluate_weights_breaks_exact_ties_as_the_service_does() -> None:
    """Weights whose models are not in name order (add-model appends): two models with the same error and cost
    everywhere are a tie, which the service gives to the smaller model id."""
    x, blob = _blobs()
    n = len(blob)
    labelled = LabelledSet(
        texts=[f"b{b}" for b in blob], task=["t"] * n, sample_ids=[str(i) for i in range(n)], models=("a", "z"),
        correct=np.tile(np.array([1.0, 0.0], dtype=np.float32), (n, 1)), cost_usd=np.full((n, 2), 0.01), sources=(),
        text_mode="full",
    )  # fmt: skip
    weights = RouterWeights(
        models=("z", "a"),  # "a" was added after "z"
        centroids=x[::PER_BLOB].copy(),
        expected_error=np.full((2, BLOBS), 0.5, dtype=np.float32),
        cost_per_1k=np.array([1.0, 1.0], dtype=np.float32),
        default_lambda=0.1,
        embedder_id="toy",
        embedder_sha256="0" * 64,
    )
    table = ScoreTable.build(weights.models, weights.expected_error, weights.cost_per_1k)
    assert table.models[0] == "a"  # the service's choice on every cluster (it picked "z" in eval before)
    report = quality.evaluate_weights(weights, labelled, x, labelled.cost_usd)
    assert set(report.curves[quality.ROUTER].accuracy.tolist()) == {1.0}  # "a" is right on every row


def _without_model(labelled: LabelledSet, name: str) -> LabelledSet:
    keep = [i for i, m in enumerate(labelled.models) if m != name]
    return LabelledSet(
        texts=labelled.texts,
        task=labelled.task,
        sample_ids=labelled.sample_ids,
        models=tuple(labelled.models[i] for i in keep),
        correct=labelled.correct[:, keep],
        cost_usd=labelled.cost_usd[:, keep],
        sources=(),
        text_mode="last_block",
    )


def test_realised_costs_fall_back_to_prices() -> None:
    labelled, _ = _labelled()
    observed, how = quality.realised_costs(labelled, None)
    assert how.startswith("observed")
    assert observed is labelled.cost_usd
    no_costs = LabelledSet(**{**labelled.__dict__, "cost_usd": np.full_like(labelled.cost_usd, np.nan)})
    priced, how = quality.realised_costs(no_costs, np.array([0.1, 1.0, 0.4]))
    assert how == "list price per model"
    np.testing.assert_allclose(priced[5], [0.1, 1.0, 0.4])
    with pytest.raises(ValueError, match="no prices"):
        quality.realised_costs(no_costs, None)


# --- the command -------------------------------------------------------------------------------


def _write_data(tmp_path: Path) -> Path:
    labelled, _ = _labelled()
    path = tmp_path / "train.jsonl"
    with path.open("w", encoding="utf-8") as fh:
        for i, text in enumerate(labelled.texts):
            row: dict[str, object] = {"prompt": text, "eval_name": labelled.task[i]}
            for m, name in enumerate(MODELS):
                value = labelled.correct[i, m]
                row[name] = None if np.isnan(value) else float(value)
                row[f"{name}|total_cost"] = float(labelled.cost_usd[i, m])
            fh.write(json.dumps(row) + "\n")
    prices = {m: {"input": p[0], "output": p[1]} for m, p in PRICES.items()}
    (tmp_path / "prices.json").write_text(json.dumps(prices), encoding="utf-8")
    return path


def _fake_embed(texts: Sequence[str], **_: object) -> tuple[np.ndarray, str, str]:
    x, blob = _blobs()
    first = {int(b): i for i, b in reversed(list(enumerate(blob)))}
    return x[[first[int(t[1:])] + i % PER_BLOB for i, t in enumerate(texts)]], "toy", "0" * 64


def test_eval_main_cross_validates_and_writes_json_markdown_png(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data = _write_data(tmp_path)
    monkeypatch.setattr(fit, "embed_prompts", _fake_embed)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    prefix = tmp_path / "out" / "quality"
    argv = [
        "--data",
        str(data),
        "--cv",
        "3",
        "--clusters",
        "4",
        "--restarts",
        "1",
        "--out",
        str(prefix),
        "--no-progress",
    ]
    assert eval_main(parser.parse_args(argv)) == 0
    document = json.loads(prefix.with_suffix(".json").read_text())
    assert document["folds"] == 3
    assert document["settings"]["clusters"] == 4
    assert document["data"][0]["name"] == "train.jsonl"
    assert set(document["summary"]["router"]) >= {"audc", "qnc", "acc@0.1"}
    assert document["router_minus_plain_audc"]["n"] == 3
    assert prefix.with_suffix(".png").read_bytes().startswith(b"\x89PNG")
    markdown = prefix.with_suffix(".md").read_text()
    assert markdown.startswith("# Router quality: 3-fold cross-validation")
    assert markdown in capsys.readouterr().out


def _data_and_weights(tmp_path: Path) -> tuple[Path, RouterWeights]:
    """The toy labelled file (with its prices beside it) and weights fitted on it."""
    data = _write_data(tmp_path)
    labelled = load_labelled([data])
    x, _, _ = _fake_embed(labelled.texts)
    weights = fit.fit_weights(
        labelled, x, prices=PRICES, embedder_id="toy", embedder_sha256="0" * 64, k=4, n_restarts=1
    )
    return data, weights


def _eval_setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[Path, RouterWeights, Path, argparse.ArgumentParser]:
    """The toy data, weights fitted on it and saved, embedding faked, and eval's parser."""
    data, weights = _data_and_weights(tmp_path)
    path = tmp_path / "w.safetensors"
    save_weights(weights, path)
    monkeypatch.setattr(fit, "embed_prompts", _fake_embed)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    return data, weights, path, parser


def test_eval_main_scores_a_weights_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data, weights, path, parser = _eval_setup(tmp_path, monkeypatch)
    prefix = tmp_path / "scored"
    argv = ["--data", str(data), "--weights", str(path), "--out", str(prefix), "--no-progress"]
    assert eval_main(parser.parse_args(argv)) == 0
    document = json.loads(prefix.with_suffix(".json").read_text())
    assert document["weights"]["version"] == weights.version
    assert document["folds"] == 0
    assert "router" in document["pooled"]
    assert "± " not in prefix.with_suffix(".md").read_text()
    # weights bring their own costs and the rows their realised ones: no price list needed to score them
    (tmp_path / "prices.json").unlink()
    assert eval_main(parser.parse_args([*argv[:-3], "--out", str(tmp_path / "no-prices"), "--no-progress"])) == 0
    again = json.loads((tmp_path / "no-prices.json").read_text())
    assert again["pooled"]["router"] == document["pooled"]["router"]
    # nor does a price list beside the data that lacks a model (this failed with "no price for model(s)")
    first = next(iter(PRICES))
    (tmp_path / "prices.json").write_text(json.dumps({first: {"input": 1.0, "output": 1.0}}), encoding="utf-8")
    # and --out naming one of the outputs is taken as the prefix (this wrote part.json.json)
    assert eval_main(parser.parse_args([*argv[:-3], "--out", str(tmp_path / "part.json"), "--no-progress"])) == 0
    assert json.loads((tmp_path / "part.json").read_text())["pooled"]["router"] == document["pooled"]["router"]
    assert (tmp_path / "part.md").is_file() and not (tmp_path / "part.json.json").exists()
    (tmp_path / "prices.json").unlink()
    # fitting folds with --costs prices does need one, and says so
    cv = parser.parse_args(["--data", str(data), "--cv", "2", "--out", str(tmp_path / "cv"), "--no-progress"])
    assert eval_main(cv) == 1
    assert "needs a price list" in capsys.readouterr().err
    bad = parser.parse_args(["--data", str(tmp_path / "missing.csv"), "--weights", str(path), "--out", str(prefix)])
    assert eval_main(bad) == 1
    assert "missing.csv" in capsys.readouterr().err


def test_eval_main_warns_when_the_weights_were_fitted_on_the_evaluated_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Scored on their own training files, weights look better than they route unseen prompts (the shipped weights:
    AUDC 0.854 in-sample against 0.836 cross-validated), and nothing said so."""
    data, weights, path, parser = _eval_setup(tmp_path, monkeypatch)
    argv = ["--data", str(data), "--weights", str(path), "--out", str(tmp_path / "in"), "--no-progress"]
    assert eval_main(parser.parse_args(argv)) == 0
    warning = json.loads((tmp_path / "in.json").read_text())["warning"]
    assert data.name in warning and "in-sample" in warning
    assert f"**Warning: {warning}.**" in (tmp_path / "in.md").read_text()
    assert f"warning: {warning}" in capsys.readouterr().err
    other = tmp_path / "other.jsonl"  # the same rows in another order: not the file the weights were fitted on
    other.write_text("".join(reversed(data.read_text(encoding="utf-8").splitlines(keepends=True))), encoding="utf-8")
    argv = ["--data", str(other), "--weights", str(path), "--out", str(tmp_path / "out"), "--no-progress"]
    assert eval_main(parser.parse_args(argv)) == 0
    assert "warning" not in json.loads((tmp_path / "out.json").read_text())
    # a model added to the weights was estimated on that file (add-model records it so)
    added = dataclasses.replace(weights, metadata={**weights.metadata, "added_models": [{"files": [
        {"name": other.name, "sha256": file_sha256(other), "rows": 1}]}]})  # fmt: skip
    save_weights(added, path)
    assert eval_main(parser.parse_args(argv)) == 0
    assert other.name in json.loads((tmp_path / "out.json").read_text())["warning"]


def test_eval_main_reports_weights_whose_fit_metadata_is_malformed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    data, weights = _data_and_weights(tmp_path)
    path = tmp_path / "w.safetensors"
    save_weights(replace(weights, metadata={"fit": "from another tool"}), path)  # valid weights, odd metadata
    monkeypatch.setattr(fit, "embed_prompts", _fake_embed)
    parser = argparse.ArgumentParser()
    add_eval_arguments(parser)
    argv = ["--data", str(data), "--weights", str(path), "--out", str(tmp_path / "scored"), "--no-progress"]
    assert eval_main(parser.parse_args(argv)) == 1  # an AttributeError traceback before
    assert "eval failed: " in (err := capsys.readouterr().err)
    assert "metadata 'fit' must be a JSON object" in err


def test_loader_reads_jsonl_and_models_named_by_prices(tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    rows = [
        {"prompt": "a\n\nq1", "eval_name": "t", "x": 1, "y": True, "y|total_cost": 0.5, "note": "n"},
        {"prompt": "q2", "eval_name": "t", "x": None, "y": 0.0, "y|total_cost": None},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    only_costed = load_labelled([path])
    assert only_costed.models == ("y",)
    data = load_labelled([path], price_models=("x", "unused"))
    assert data.models == ("x", "y")
    assert data.texts == ["q1", "q2"]
    np.testing.assert_array_equal(data.correct, [[1.0, 1.0], [np.nan, 0.0]])
    np.testing.assert_array_equal(data.cost_usd, [[np.nan, 0.5], [np.nan, np.nan]])


def test_loader_rejects_bad_jsonl(tmp_path: Path) -> None:
    from service.router.offline.data import DataError

    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": "a", "m": 1, "m|total_cost": 0}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(DataError, match="each line must be a JSON object"):
        load_labelled([path])
    path.write_text('{"prompt": "a", "m": {"nested": 1}, "m|total_cost": 0}\n', encoding="utf-8")
    with pytest.raises(DataError, match="values must be"):
        load_labelled([path])
    path.write_text("not json\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":1: not JSON \(Expecting value, column 1\)"):
        load_labelled([path])
    # the file's line, not the position within the line (which said "line 1" for line 3)
    path.write_text('{"prompt": "a", "m": 1, "m|total_cost": 0}\n\n{"prompt": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"\.jsonl:3: not JSON"):
        load_labelled([path])
    path.write_text("[" * 100_000 + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r":1: JSON nested too deeply"):
        load_labelled([path])


def test_fit_with_costs_from_rows(tmp_path: Path) -> None:
    labelled, x = _labelled()
    weights = fit.fit_weights(labelled, x, prices=None, embedder_id="toy", embedder_sha256="0" * 64, k=4, n_restarts=1)
    np.testing.assert_allclose(weights.cost_per_1k, [0.1, 1.0, 0.4], rtol=1e-6)
    assert weights.metadata["cost_unit"] == fit.COST_UNIT_ROWS
    assert weights.metadata["observed_cost_usd_per_call"]["dear"] == pytest.approx(0.01)
    assert weights.metadata["fit"]["prior"] == "task"
    assert weights.metadata["fit"]["alpha_selection"]["criterion"] == "audc"
    assert sum(weights.metadata["fit"]["cluster_task_counts"]["task0"]) == 2 * PER_BLOB


def test_costs_from_rows_name_a_model_without_any_row_cost(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # "mid" is a model only because the price list names it: it has no per-row cost. This said
    # "models at columns [2] have no observed cost".
    path = tmp_path / "train.jsonl"
    rows = [{"prompt": f"b{i % 4}", "cheap": i % 2, "dear": 1, "mid": 0, "cheap|total_cost": 0.001} for i in range(12)]
    path.write_text("".join(json.dumps({**r, "dear|total_cost": 0.01}) + "\n" for r in rows), encoding="utf-8")
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({m: {"input": p[0], "output": p[1]} for m, p in PRICES.items()}), encoding="utf-8")
    labelled = load_labelled([path], price_models=MODELS)
    with pytest.raises(ValueError, match=r"--costs rows needs a per-row cost of every model.* none for 'mid'"):
        fit.fit_weights(
            labelled, _fake_embed(labelled.texts)[0], prices=None, embedder_id="t", embedder_sha256="0" * 64
        )

    def no_embedding(*_: object, **__: object) -> None:
        raise AssertionError("embedded before checking the costs")

    monkeypatch.setattr(fit, "embed_prompts", no_embedding)
    common = ["--data", str(path), "--prices", str(prices), "--costs", "rows", "--clusters", "2"]
    fit_parser = argparse.ArgumentParser()
    add_fit_arguments(fit_parser)
    assert fit.fit_main(fit_parser.parse_args([*common, "--out", str(tmp_path / "w.safetensors")])) == 1
    assert "none for 'mid'" in capsys.readouterr().err
    eval_parser = argparse.ArgumentParser()
    add_eval_arguments(eval_parser)
    assert eval_main(eval_parser.parse_args([*common, "--cv", "2", "--out", str(tmp_path / "q"), "--no-progress"])) == 1
    assert "none for 'mid'" in capsys.readouterr().err
