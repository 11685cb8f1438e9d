from __future__ import annotations

import argparse
import csv
import json
import math
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest

from service.digest import git_commit, source_commit
from service.router.offline import costs, estimate, fit
from service.router.offline.data import DataError, LabelledSet, extract_text, load_labelled, load_prices
from service.router.offline.options import add_fit_arguments
from service.router.weights import default_weights_path, load_weights, save_weights

SHARED_DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "routerbench"
TRAIN_FILES = {"arc_challenge_train.csv": 1039, "mbpp_train.csv": 299, "winograde_train.csv": 887}
NAN = math.nan


# --- cluster_error -----------------------------------------------------------------------------


def test_single_observation_is_shrunk_toward_global_rate() -> None:
    # Model 0: rows 0-4 in cluster 0 (4 wrong of 5), row 5 alone in cluster 1 (wrong).
    assign = np.array([0, 0, 0, 0, 0, 1])
    correct = np.array([[0.0], [0.0], [0.0], [0.0], [1.0], [0.0]])
    g = 5 / 6
    error = fit.cluster_error(assign, correct, k=2, alpha=4.0)
    assert error.shape == (1, 2)
    assert error.dtype == np.float32
    assert error[0, 1] == pytest.approx((1 + 4 * g) / (1 + 4))
    assert error[0, 0] == pytest.approx((4 + 4 * g) / (5 + 4))


def test_alpha_zero_gives_raw_cluster_rates() -> None:
    assign = np.array([0, 0, 1, 1, 1])
    correct = np.array([[1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    error = fit.cluster_error(assign, correct, k=2, alpha=0.0)
    np.testing.assert_allclose(error, [[0.5, 1 / 3], [1.0, 0.0]], rtol=1e-6)


def test_nan_outcomes_are_excluded_per_model() -> None:
    assign = np.array([0, 0, 0, 1])
    correct = np.array([[NAN, 1.0], [0.0, 1.0], [NAN, 0.0], [1.0, 1.0]])
    # Model 0 observed twice (one wrong) -> g0 = 1/2; model 1 observed 4 times (one wrong) -> g1 = 1/4.
    error = fit.cluster_error(assign, correct, k=2, alpha=2.0)
    assert error[0, 0] == pytest.approx((1 + 2 * 0.5) / (1 + 2))
    assert error[1, 0] == pytest.approx((1 + 2 * 0.25) / (3 + 2))
    assert error[0, 1] == pytest.approx((0 + 2 * 0.5) / (1 + 2))


@pytest.mark.parametrize("alpha", [0.0, 3.0])
def test_empty_cluster_gets_global_rate(alpha: float) -> None:
    assign = np.array([0, 0, 2])
    correct = np.array([[1.0, NAN], [0.0, 0.0], [0.0, 1.0]])
    error = fit.cluster_error(assign, correct, k=3, alpha=alpha)
    np.testing.assert_allclose(error[:, 1], [2 / 3, 0.5], rtol=1e-6)
    # Model 1 has no observed outcome in cluster 0 (one NaN, one wrong -> only the wrong counts).
    assert error[1, 0] == pytest.approx((1 + alpha * 0.5) / (1 + alpha))


def test_fractional_outcomes_count_as_partial_errors() -> None:
    error = fit.cluster_error(np.array([0, 0]), np.array([[0.25], [1.0]]), k=1, alpha=0.0)
    assert error[0, 0] == pytest.approx(0.375)


def test_cluster_error_rejects_bad_inputs() -> None:
    correct = np.array([[1.0], [0.0]])
    with pytest.raises(ValueError, match="cluster ids"):
        fit.cluster_error(np.array([0, 5]), correct, k=2, alpha=1.0)
    with pytest.raises(ValueError, match="alpha"):
        fit.cluster_error(np.array([0, 1]), correct, k=2, alpha=-1.0)
    with pytest.raises(ValueError, match="assign must be"):
        fit.cluster_error(np.array([0]), correct, k=2, alpha=1.0)
    with pytest.raises(ValueError, match="no observed outcomes"):
        fit.cluster_error(np.array([0, 1]), np.array([[NAN], [NAN]]), k=2, alpha=1.0)


# --- alpha selection ---------------------------------------------------------------------------


def _synthetic_outcomes(cluster_effect: bool, n: int = 600, k: int = 6, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    assign = rng.integers(0, k, size=n)
    p_correct = np.where(assign % 2 == 0, 0.95, 0.05) if cluster_effect else np.full(n, 0.5)
    correct = (rng.uniform(size=n) < p_correct).astype(np.float64)[:, None]
    return assign, correct


def test_select_alpha_prefers_little_shrinkage_when_clusters_differ() -> None:
    assign, correct = _synthetic_outcomes(cluster_effect=True)
    choice = fit.select_alpha(assign, correct, 6)
    assert choice.alpha <= 4.0
    assert choice.criterion == "log-loss"
    assert min(choice.cv_score) == choice.cv_score[choice.grid.index(choice.alpha)]
    assert len(choice.cv_score) == len(choice.grid)


def test_select_alpha_prefers_strong_shrinkage_when_clusters_are_alike() -> None:
    assign, correct = _synthetic_outcomes(cluster_effect=False)
    choice = fit.select_alpha(assign, correct, 6)
    assert choice.alpha >= 16.0
    assert choice.as_metadata()["alpha"] == choice.alpha


def test_select_alpha_is_deterministic() -> None:
    assign, correct = _synthetic_outcomes(cluster_effect=True, seed=3)
    assert fit.select_alpha(assign, correct, 6) == fit.select_alpha(assign, correct, 6)


# --- k-means, costs, fit_weights ---------------------------------------------------------------


def _unit_blobs(n_per: int = 40, k: int = 4, dim: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim))
    points = np.repeat(centres, n_per, axis=0) + 0.1 * rng.normal(size=(k * n_per, dim))
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def test_kmeans_is_deterministic_and_unit_norm() -> None:
    x = _unit_blobs()
    first = fit.kmeans_centroids(x, 4, seed=7, n_restarts=2)
    second = fit.kmeans_centroids(x, 4, seed=7, n_restarts=2)
    assert first.shape == (4, 16)
    assert first.dtype == np.float32
    np.testing.assert_array_equal(first, second)
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1.0, atol=1e-6)
    # Well-separated blobs: each blob lands in a cluster of its own.
    assign = fit.assign_clusters(x, first)
    assert sorted(np.bincount(assign, minlength=4).tolist()) == [40, 40, 40, 40]


def test_kmeans_rejects_too_few_points() -> None:
    with pytest.raises(ValueError, match="N >= k"):
        fit.kmeans_centroids(_unit_blobs(n_per=1), 10, seed=0, n_restarts=1)
    with pytest.raises(ValueError, match="n_restarts"):
        fit.kmeans_centroids(_unit_blobs(), 2, seed=0, n_restarts=0)


def test_relative_costs_blend_three_to_one() -> None:
    prices = {"cheap": (0.001, 0.002), "dear": (0.01, 0.03)}
    blended = costs.blended_prices(["cheap", "dear"], prices)
    np.testing.assert_allclose(blended, [(3 * 0.001 + 0.002) / 4, (3 * 0.01 + 0.03) / 4])
    np.testing.assert_allclose(costs.relative_costs(blended), [0.00125 / 0.015, 1.0], rtol=1e-6)
    with pytest.raises(ValueError, match="no price for model"):
        costs.blended_prices(["cheap", "missing"], prices)
    with pytest.raises(ValueError, match="positive price"):
        costs.relative_costs(np.zeros(2))


def test_observed_costs_compare_models_on_the_same_prompts() -> None:
    nan = np.nan
    # "cheap" always costs a fifth of "dear" on the same prompt, but its cost was recorded on the short prompts only
    cost_usd = np.array([[0.2, 1.0], [nan, 10.0], [0.4, 2.0], [nan, 20.0]])
    relative = costs.relative_costs(costs.absolute_costs(["cheap", "dear"], cost_usd, None))
    np.testing.assert_allclose(relative, [0.2, 1.0], rtol=1e-6)  # own-row means made it 0.036
    with pytest.raises(ValueError, match="none of the labelled rows has a cost for every model"):
        costs.require_observed_costs(["cheap", "dear"], np.array([[0.2, nan], [nan, 1.0]]))


def _toy_labelled(n: int, models: Sequence[str] = ("a", "b"), seed: int = 0) -> LabelledSet:
    rng = np.random.default_rng(seed)
    correct = (rng.uniform(size=(n, len(models))) < 0.7).astype(np.float32)
    correct[0, 0] = np.nan
    return LabelledSet(
        texts=[f"q{i}" for i in range(n)],
        task=["t"] * n,
        sample_ids=[str(i) for i in range(n)],
        models=tuple(models),
        correct=correct,
        cost_usd=np.full((n, len(models)), 0.001),
        sources=(),
        text_mode="last_block",
    )


TOY_PRICES = {"a": (0.001, 0.001), "b": (0.004, 0.008), "unused": (1.0, 1.0)}


def test_fit_weights_produces_valid_round_trippable_weights(tmp_path: Path) -> None:
    x = _unit_blobs()
    labelled = _toy_labelled(len(x))
    weights = fit.fit_weights(
        labelled, x, prices=TOY_PRICES, embedder_id="toy", embedder_sha256="0" * 64, k=4, n_restarts=1
    )
    assert (weights.num_models, weights.num_clusters, weights.dim) == (2, 4, 16)
    np.testing.assert_allclose(weights.cost_per_1k, [0.001 / 0.005, 1.0], rtol=1e-6)
    meta = weights.metadata
    assert meta["fit"]["alpha"] in estimate.DEFAULT_ALPHA_GRID
    assert meta["fit"]["alpha_selection"]["method"].startswith("5-fold")
    assert meta["training_data"]["rows_used"] == len(x)
    assert meta["price_usd_per_1k"]["b"] == {"input": 0.004, "output": 0.008, "blended": pytest.approx(0.005)}
    path = tmp_path / "w.safetensors"
    save_weights(weights, path)
    assert load_weights(path).version == weights.version
    again = fit.fit_weights(
        labelled, x, prices=TOY_PRICES, embedder_id="toy", embedder_sha256="0" * 64, k=4, n_restarts=1
    )
    assert again.version == weights.version


def test_fit_weights_uses_given_alpha_and_checks_shapes() -> None:
    x = _unit_blobs()
    labelled = _toy_labelled(len(x))
    weights = fit.fit_weights(
        labelled, x, prices=TOY_PRICES, embedder_id="toy", embedder_sha256="0" * 64, k=4, alpha=2.5, n_restarts=1
    )
    assert weights.metadata["fit"]["alpha_selection"] == {"alpha": 2.5, "method": "given"}
    with pytest.raises(ValueError, match="embeddings must be"):
        fit.fit_weights(labelled, x[:-1], prices=TOY_PRICES, embedder_id="toy", embedder_sha256="0" * 64, k=4)


# --- extract_text ------------------------------------------------------------------------------

FEW_SHOT = "Q: 1+1?\nAnswer:\n2\n\nQ: 2+2?\nAnswer:\n4\n\nQ: What is 3+3?\nA) 5\nB) 6\nAnswer:"


def test_extract_text_last_block_of_plain_prompt() -> None:
    assert extract_text(FEW_SHOT) == "Q: What is 3+3?\nA) 5\nB) 6\nAnswer:"
    assert extract_text("  no blank line here \n") == "no blank line here"
    # blank lines written with Windows line endings, or holding spaces, separate blocks too
    assert extract_text(FEW_SHOT.replace("\n", "\r\n")) == "Q: What is 3+3?\nA) 5\nB) 6\nAnswer:"
    assert extract_text("shot 1\nA: x\n \t\nthe question?") == "the question?"
    assert extract_text(FEW_SHOT, "full") == FEW_SHOT


def test_extract_text_decodes_routerbench_list_repr() -> None:
    # RouterBench stores prompts as a Python list repr with escaped newlines.
    stored = repr([FEW_SHOT])
    assert "\n" not in stored
    assert extract_text(stored) == "Q: What is 3+3?\nA) 5\nB) 6\nAnswer:"
    assert extract_text(repr([FEW_SHOT, FEW_SHOT])) == "Q: What is 3+3?\nA) 5\nB) 6\nAnswer:"
    assert extract_text(stored, "full") == FEW_SHOT


def test_extract_text_leaves_non_list_brackets_alone() -> None:
    assert extract_text("[1, 2, 3]") == "[1, 2, 3]"
    assert extract_text("[not python") == "[not python"
    with pytest.raises(ValueError, match="text mode"):
        extract_text("x", "middle")  # type: ignore[arg-type]


# --- loader ------------------------------------------------------------------------------------

MODELS = ("model-b", "model-a")


def _write_csv(path: Path, rows: list[dict[str, str]], models: Sequence[str] = MODELS) -> Path:
    header = ["", "sample_id", "prompt", "eval_name", *models]
    header += [f"{m}|model_response" for m in models] + [f"{m}|total_cost" for m in models]
    header += ["oracle_model_to_route_to"]
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=header)
        writer.writeheader()
        for i, row in enumerate(rows):
            writer.writerow({"": str(i), "sample_id": f"s{i}", "eval_name": "toy", **row})
    return path


def _row(prompt: str, outcomes: Sequence[str], costs: Sequence[str] = ("0.1", "0.2")) -> dict[str, str]:
    row = {"prompt": prompt}
    for model, outcome, cost in zip(MODELS, outcomes, costs, strict=True):
        row[model] = outcome
        row[f"{model}|total_cost"] = cost
        row[f"{model}|model_response"] = 'line one\nline two, with a "quote"'
    return row


def test_loader_reads_outcomes_costs_and_empty_cells(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "toy.csv",
        [
            _row(repr([FEW_SHOT]), ["1.0", "0.0"]),
            _row("plain\n\nsecond block", ["", "1.0"], ["", "0.3"]),
        ],
    )
    data = load_labelled([path])
    assert data.models == ("model-a", "model-b")  # sorted
    assert data.num_rows == 2
    assert data.texts == ["Q: What is 3+3?\nA) 5\nB) 6\nAnswer:", "second block"]
    assert data.task == ["toy", "toy"]
    assert data.sample_ids == ["s0", "s1"]
    assert data.correct.dtype == np.float32
    np.testing.assert_array_equal(data.correct, [[0.0, 1.0], [1.0, np.nan]])
    np.testing.assert_array_equal(data.cost_usd, [[0.2, 0.1], [0.3, np.nan]])
    assert data.sources[0].name == "toy.csv"
    assert data.sources[0].rows == 2
    assert [(s.name, len(s.sha256)) for s in data.sources] == [("toy.csv", 64)]
    assert load_labelled([path], text_mode="full").texts[1] == "plain\n\nsecond block"


def test_loader_concatenates_files(tmp_path: Path) -> None:
    first = _write_csv(tmp_path / "one.csv", [_row("a", ["1", "0"])])
    second = _write_csv(tmp_path / "two.csv", [_row("b", ["0", "1"]), _row("c", ["1", "1"])])
    data = load_labelled([first, second])
    assert data.texts == ["a", "b", "c"]
    assert [s.rows for s in data.sources] == [1, 2]


def test_loader_rejects_mismatched_models(tmp_path: Path) -> None:
    first = _write_csv(tmp_path / "one.csv", [_row("a", ["1", "0"])])
    other = _write_csv(tmp_path / "two.csv", [{"prompt": "x", "zz": "1", "zz|total_cost": "0"}], models=("zz",))
    with pytest.raises(DataError, match="differ from earlier files"):
        load_labelled([first, other])


@pytest.mark.parametrize(
    ("value", "message"),
    [("yes", "is not a number"), ("2.0", r"outside \[0, 1\]"), ("nan", r"is NaN: leave the cell empty \(or null\)")],
)
def test_loader_rejects_bad_outcomes(tmp_path: Path, value: str, message: str) -> None:
    path = _write_csv(tmp_path / "bad.csv", [_row("a", [value, "0"])])
    with pytest.raises(DataError, match=message) as info:
        load_labelled([path])
    assert "bad.csv" in str(info.value)


def test_loader_refuses_the_same_file_twice(tmp_path: Path) -> None:
    """Its rows counted twice in k-means, and with --cv landed in both a fold's training and its test rows."""
    data = _write_csv(tmp_path / "t.csv", [_row(f"q{i}", ["1", "0"]) for i in range(3)])
    copy = tmp_path / "copy.csv"
    copy.write_bytes(data.read_bytes())
    with pytest.raises(DataError, match=r"copy\.csv: the same content as an earlier --data file"):
        load_labelled([data, copy])
    assert load_labelled([data]).num_rows == 3


def test_loader_rejects_missing_file_and_no_models(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="cannot read CSV"):
        load_labelled([tmp_path / "missing.csv"])
    path = tmp_path / "nomodels.csv"
    path.write_text("prompt,eval_name\nhello,x\n", encoding="utf-8")
    with pytest.raises(DataError, match="no model columns"):
        load_labelled([path])


def test_loader_rejects_a_column_named_twice(tmp_path: Path) -> None:
    # csv.DictReader keeps the last of two equal names: model-a's outcomes would silently be the second column's.
    path = tmp_path / "dup.csv"
    path.write_text("prompt,model-a,model-a|total_cost,model-a\nq1,1.0,0.1,0.0\nq2,1.0,0.1,0.0\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"named more than once.*'model-a'") as info:
        load_labelled([path])
    assert "dup.csv" in str(info.value)


@pytest.mark.parametrize("prompt", ["", "   ", "\n\n"])
def test_loader_rejects_an_empty_prompt(tmp_path: Path, prompt: str) -> None:
    # it was embedded as empty text and fitted on, silently
    path = _write_csv(tmp_path / "train.csv", [_row("q1", ["1", "0"]), _row(prompt, ["1", "0"])])
    with pytest.raises(DataError, match=r"train\.csv:\d+: the prompt is empty"):
        load_labelled([path])


def test_loader_names_a_json_file_for_what_it_is(tmp_path: Path) -> None:
    # read as CSV, it failed with "no 'prompt' column"
    path = tmp_path / "train.json"
    path.write_text('[{"prompt": "q1", "m": 1, "m|total_cost": 0.1}]', encoding="utf-8")
    with pytest.raises(DataError, match=r"train\.json: give CSV, or JSON Lines \(\.jsonl"):
        load_labelled([path])


def test_loader_rejects_a_jsonl_key_given_twice(tmp_path: Path) -> None:
    path = tmp_path / "dup.jsonl"
    path.write_text(
        '{"prompt": "q1", "m": 1, "m|total_cost": 0.1}\n{"prompt": "q2", "m": 1, "m|total_cost": 0.1, "m": 0}\n',
        encoding="utf-8",
    )
    with pytest.raises(DataError, match=r"dup\.jsonl:2: key 'm' appears more than once"):
        load_labelled([path])


def test_loader_reads_files_with_a_utf8_byte_order_mark(tmp_path: Path) -> None:
    # Spreadsheets save "CSV UTF-8" with a BOM; it used to end up in the first column's name ("\ufeffprompt").
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + b"prompt,m,m|total_cost\nq1,1.0,0.1\nq2,0.0,0.1\n")
    data = load_labelled([bom])
    assert data.texts == ["q1", "q2"]
    assert data.models == ("m",)
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + b'{"prompt": "q1", "m": 1, "m|total_cost": 0.1}\n')
    assert load_labelled([jsonl]).texts == ["q1"]
    prices = tmp_path / "prices.json"
    prices.write_bytes(b"\xef\xbb\xbf" + json.dumps({"m": {"input": 0.001, "output": 0.002}}).encode())
    assert load_prices(prices) == {"m": (0.001, 0.002)}


def test_load_prices_names_the_file_when_it_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_bytes(b'{"m\xe9": {"input": 0.001, "output": 0.002}}')
    with pytest.raises(DataError, match=r"prices\.json: cannot read prices"):
        load_prices(path)


def test_load_prices_skips_annotations(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"_unit": "USD", "m": {"input": 0.001, "output": 0.002}}), encoding="utf-8")
    assert load_prices(path) == {"m": (0.001, 0.002)}
    path.write_text(json.dumps({"m": {"input": 0.001}}), encoding="utf-8")
    with pytest.raises(DataError, match="needs numeric 'input' and 'output'"):
        load_prices(path)
    path.write_text(json.dumps({"m": {"input": -1, "output": 0}}), encoding="utf-8")
    with pytest.raises(DataError, match="finite and >= 0"):
        load_prices(path)


def test_real_routerbench_files_load() -> None:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"{SHARED_DATA} not present")
    for name, rows in TRAIN_FILES.items():
        data = load_labelled([SHARED_DATA / name])
        assert data.num_rows == rows
        assert len(data.models) == 11
        # The last block is the question itself, not the shared 5-shot prefix.
        assert len(set(data.texts)) > 0.95 * rows
    arc = load_labelled([SHARED_DATA / "arc_challenge_train.csv"])
    assert np.isnan(arc.correct).any()  # the known empty ARC cells
    assert set(load_prices(SHARED_DATA / "prices.json")) >= set(arc.models)


# --- CLI ---------------------------------------------------------------------------------------


def test_fit_main_writes_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    rows = [_row(f"question {i}", ["1" if i % 3 else "0", "1" if i % 2 else "0"]) for i in range(40)]
    data = _write_csv(tmp_path / "train.csv", rows)
    (tmp_path / "prices.json").write_text(
        json.dumps({m: {"input": 0.001 * (i + 1), "output": 0.002} for i, m in enumerate(MODELS)}), encoding="utf-8"
    )

    def fake_embed(texts: Sequence[str], **_: object) -> tuple[np.ndarray, str, str]:
        return _unit_blobs(n_per=10, k=4)[: len(texts)], "fake-embedder", "f" * 64

    monkeypatch.setattr(fit, "embed_prompts", fake_embed)
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    out = tmp_path / "out" / "w.safetensors"
    args = parser.parse_args(["--data", str(data), "--out", str(out), "--clusters", "4", "--restarts", "1"])
    assert fit.fit_main(args) == 0
    weights = load_weights(out)
    assert weights.embedder_id == "fake-embedder"
    assert weights.num_clusters == 4
    assert weights.metadata["provenance"]["prices_file"] == "prices.json"
    recorded = weights.metadata["tool"]["git_commit"]
    assert recorded is not None and recorded == source_commit()  # the code that fitted (tests run from a checkout)
    printed = capsys.readouterr().out
    assert weights.version in printed
    assert "model-a" in printed


def test_source_commit_is_none_for_a_package_installed_inside_another_repository(tmp_path: Path) -> None:
    """git found the enclosing repository of a .venv and recorded that project's commit as the fitting code's."""
    outer = tmp_path / "outer"
    site = outer / ".venv" / "lib" / "site-packages"
    site.mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(outer)], check=True)
    subprocess.run(["git", "-C", str(outer), "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q",
                    "--allow-empty", "-m", "x"], check=True)  # fmt: skip
    assert git_commit(site) is not None  # what the fit recorded before
    assert source_commit(site) is None
    assert source_commit(outer) == git_commit(outer)  # a checkout of its own: its commit


def test_fit_main_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    args = parser.parse_args(["--data", str(tmp_path / "missing.csv"), "--out", str(tmp_path / "w.safetensors")])
    assert fit.fit_main(args) == 1
    assert "missing.csv" in capsys.readouterr().err


def test_fit_main_names_a_model_without_any_outcome(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # model-a's column (MODELS[1]) is empty on every row: this said "models at columns [1] have no observed outcomes".
    rows = [_row(f"question {i}", ["1" if i % 3 else "0", ""]) for i in range(10)]
    data = _write_csv(tmp_path / "train.csv", rows)
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--out", str(tmp_path / "w.safetensors"), "--costs", "rows"])
    assert fit.fit_main(args) == 1  # before embedding: no embed_prompts stub is needed
    assert "train.csv: no outcome for model(s) 'model-a' in any of the 10 rows" in capsys.readouterr().err


def test_fit_main_names_an_unpriced_model_before_embedding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    data = _write_csv(tmp_path / "train.csv", [_row(f"question {i}", ["1", "0"]) for i in range(10)])
    prices = tmp_path / "prices.json"
    prices.write_text(json.dumps({"model-b": {"input": 0.001, "output": 0.002}}), encoding="utf-8")
    monkeypatch.setattr(fit, "embed_prompts", None)  # it said so only after the minutes of embedding
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    out = str(tmp_path / "w.safetensors")
    args = parser.parse_args(["--data", str(data), "--prices", str(prices), "--clusters", "2", "--out", out])
    assert fit.fit_main(args) == 1
    assert "no price for model(s): model-a" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("rows", "flags", "message"),
    [
        (0, [], "train.csv: no data rows"),  # was "need an [N, D] array with N >= k >= 1; got shape (0, 384)"
        (6, ["--clusters", "8"], "--clusters 8 needs at least 8 prompts to fit on; the data has 6"),
        (6, ["--clusters", "0"], "--clusters must be at least 1; got 0"),
        (6, ["--clusters", "2", "--restarts", "0"], "--restarts must be at least 1; got 0"),
        # was "need 2 <= folds <= rows; got 5 folds for 4 rows": folds the user never asked for
        (4, ["--clusters", "2"], "cross-validation needs at least 5 prompts; the data has 4: give --alpha"),
        # seeds: numpy's "expected non-negative integer", and FAISS's OverflowError traceback for a C int
        (6, ["--clusters", "2", "--seed", "-1"], "--seed must lie in [0, 2147483647]"),
        (6, ["--clusters", "2", "--seed", "99999999999"], "--seed must lie in [0, 2147483647]"),
        (6, ["--clusters", "2", "--seed", str(2**31 - 1)], "with the restarts' seeds (seed + restart) too"),
        # were refused only once every prompt was embedded
        (6, ["--clusters", "2", "--alpha", "-1"], "--alpha must be finite and >= 0; got -1"),
        (6, ["--clusters", "2", "--alpha", "nan"], "--alpha must be finite and >= 0; got nan"),
        (6, ["--clusters", "2", "--default-lambda", "-0.5"], "--default-lambda must be from 0 to 1e+09; got -0.5"),
    ],
)
def test_fit_main_checks_sizes_and_seed_before_embedding(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    rows: int,
    flags: list[str],
    message: str,
) -> None:
    data = _write_csv(tmp_path / "train.csv", [_row(f"q{i}", ["1", "0"]) for i in range(rows)])

    def no_embedding(*_: object, **__: object) -> None:
        raise AssertionError("embedded before checking the sizes")

    monkeypatch.setattr(fit, "embed_prompts", no_embedding)
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    argv = ["--data", str(data), "--out", str(tmp_path / "w.safetensors"), "--costs", "rows", *flags]
    assert fit.fit_main(parser.parse_args(argv)) == 1
    assert message in capsys.readouterr().err


def test_a_prompt_with_nothing_to_embed_in_its_text_mode_is_named(tmp_path: Path) -> None:
    """Its last message, or its last block, was empty: it was embedded as '' (the service refuses such a prompt)."""
    data = _write_csv(tmp_path / "t.csv", [_row("fine", ["1", "0"]), _row("['Real question', '']", ["1", "0"])])
    with pytest.raises(DataError, match=r"t\.csv:\d+: nothing to embed in the prompt with --text last_block"):
        load_labelled([data])
    blank_block = _write_csv(tmp_path / "b.csv", [_row("fine", ["1", "0"]), _row("Question?\n\n  ", ["1", "0"])])
    assert load_labelled([blank_block], text_mode="last_block").texts == ["fine", "Question?"]  # stripped first


def test_texts_that_collapse_to_a_few_are_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A template with a blank line before its answer cue: last_block kept only the cue, every prompt embedded alike,
    and fit put them all in one cluster without a word."""
    rows = [_row(f"Question {i}?\n\nAnswer:", ["1", "0"]) for i in range(6)]
    labelled = load_labelled([_write_csv(tmp_path / "t.csv", rows)])
    warning = labelled.collapsed_texts_warning()
    assert warning is not None and "only 1 distinct texts to embed in 6 rows" in warning and "'Answer:'" in warning
    assert load_labelled([_write_csv(tmp_path / "t.csv", rows)], text_mode="full").collapsed_texts_warning() is None

    def no_embedding(*_: object, **__: object) -> None:
        raise DataError("stop here")  # the warning comes before the minutes of embedding

    monkeypatch.setattr(fit, "embed_prompts", no_embedding)
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    argv = ["--data", str(tmp_path / "t.csv"), "--out", str(tmp_path / "w.safetensors"), "--costs", "rows"]
    assert fit.fit_main(parser.parse_args([*argv, "--clusters", "2", "--alpha", "1"])) == 1
    assert f"warning: {warning}" in capsys.readouterr().err


def test_fit_arguments_defaults() -> None:
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    with pytest.raises(SystemExit):  # no --out: a default of the shipped file replaced what every router loads
        parser.parse_args([])
    args = parser.parse_args(["--out", "w.safetensors"])
    assert [p.name for p in args.data] == list(TRAIN_FILES)
    assert args.clusters == 100
    assert args.seed == 0
    assert args.alpha is None
    assert args.text == "last_block"
    assert args.default_lambda == pytest.approx(0.1)


@pytest.mark.slow
def test_real_embedder_matches_shipped_weights() -> None:
    from service.router.embedder import MiniLMEmbedder

    weights = load_weights(default_weights_path())
    embedder = MiniLMEmbedder(device="cpu")
    assert embedder.model_sha256 == weights.embedder_sha256
    vectors = embedder.embed(["Write a function to reverse a string."])
    assert vectors.shape == (1, weights.dim)


def test_fit_main_names_a_most_accurate_model_that_costs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    # model-a is right on every row and free: costs cannot be normalised by it (this named it "(1)").
    rows = [_row(f"question {i}", ["1" if i % 3 else "0", "1"], costs=("0.1", "0")) for i in range(40)]
    data = _write_csv(tmp_path / "train.csv", rows)
    monkeypatch.setattr(fit, "embed_prompts", lambda texts, **_: (_unit_blobs(n_per=10, k=4), "fake", "f" * 64))
    parser = argparse.ArgumentParser()
    add_fit_arguments(parser)
    args = parser.parse_args(["--data", str(data), "--out", str(tmp_path / "w.safetensors"), "--costs", "rows",
                              "--clusters", "4", "--restarts", "1"])  # fmt: skip
    assert fit.fit_main(args) == 1
    assert "the most accurate model (model-a) has no cost to normalise by" in capsys.readouterr().err


def test_without_faiss_eval_and_add_model_import_and_a_fit_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """FAISS is an extra; fit imported it at the top, so fit, eval and add-model died with ModuleNotFoundError."""
    modules = ("eval_cli", "add_model", "fit")
    script = "import sys; sys.modules['faiss'] = None\n" + "".join(
        f"import service.router.offline.{m}\n" for m in modules
    )
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120).returncode == 0
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(ValueError, match=r"needs FAISS: pip install faiss-cpu"):
        fit.kmeans_centroids(np.eye(4, dtype=np.float32), 2)
