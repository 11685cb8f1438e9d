"""Labelled outcomes for fitting and evaluating the router: RouterBench-style CSV or JSONL files, a price list.

Each row is one prompt (CSV: a row under a header; JSONL: one JSON object per line, same keys); each
model has a correctness or score column (``1.0``/``0.0``, partial credit in between; empty or null =
no outcome) and, optionally, a ``<model>|total_cost`` column in USD. A column is a model's when it
has such a cost column or when the price list names it, so response and oracle columns are never
mistaken for models.
"""

from __future__ import annotations

import ast
import csv
import json
import math
import re
from collections import Counter
from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from service.digest import file_sha256
from service.router.offline.options import TEXT_MODES, TextMode

PROMPT_COLUMN = "prompt"
TASK_COLUMN = "eval_name"
SAMPLE_ID_COLUMN = "sample_id"
COST_SUFFIX = "|total_cost"
# a blank line, also one holding spaces or tabs (line endings are made "\n" first: a CSV saved on Windows keeps
# "\r\n" inside quoted prompts, and its few-shot prefix was embedded whole)
BLOCK_SEPARATOR = re.compile(r"\n[ \t]*\n")
# Below this share of distinct texts to embed, the prompts most likely lost their content to the text mode (the
# routerbench train files keep 99 % or more distinct).
MIN_DISTINCT_TEXT_SHARE = 0.5
JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIX = ".json"  # one JSON document, not a row a line
# UTF-8, with or without the byte-order mark that spreadsheet programs put before "CSV UTF-8" exports.
TEXT_ENCODING = "utf-8-sig"


class DataError(ValueError):
    """Training data or prices that cannot be used; the message names the file (and row)."""


@dataclass(frozen=True)
class SourceFile:
    name: str
    sha256: str
    rows: int


# eq=False: ndarray fields make field-wise == ambiguous.
@dataclass(frozen=True, eq=False)
class LabelledSet:
    texts: list[str]  # what gets embedded, one per row
    task: list[str]  # eval_name per row
    sample_ids: list[str]
    models: tuple[str, ...]  # sorted
    correct: np.ndarray  # [N, M] float32, 1 = correct, 0 = wrong, NaN = no outcome
    cost_usd: np.ndarray  # [N, M] float64 USD per call, NaN where missing
    sources: tuple[SourceFile, ...]
    text_mode: TextMode

    @property
    def num_rows(self) -> int:
        return len(self.texts)

    def sources_json(self) -> list[dict[str, object]]:
        """The files read, as results and weights record them (name, sha256, rows)."""
        return [asdict(source) for source in self.sources]

    def collapsed_texts_warning(self) -> str | None:
        """A warning when the texts to embed are mostly the same: a template that puts a blank line before the
        answer cue makes ``last_block`` keep only the cue (every prompt then embeds alike and lands in one cluster)."""
        distinct = len(set(self.texts))
        if distinct >= MIN_DISTINCT_TEXT_SHARE * self.num_rows:
            return None
        common, count = Counter(self.texts).most_common(1)[0]
        return (
            f"only {distinct} distinct texts to embed in {self.num_rows} rows (--text {self.text_mode}); "
            f"{count} are {common[:60]!r}: check the prompts' template, or try --text full"
        )

    @property
    def task_counts(self) -> dict[str, int]:
        return dict(sorted(Counter(self.task).items()))


def decode_prompt(raw: str) -> str:
    """The prompt as a user would send it.

    RouterBench stores each prompt as the ``repr`` of a Python list of messages (newlines escaped
    as ``\\n``), e.g. ``"['Question...\\nAnswer:']"``; a few rows repeat the message twice. The last
    message is the one being answered. Anything that is not such a list is returned unchanged.
    """
    stripped = raw.strip()
    if not (stripped.startswith("[") and stripped.endswith("]")):
        return raw
    try:
        value = ast.literal_eval(stripped)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return raw
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return value[-1]
    return raw


def extract_text(prompt: str, mode: TextMode = "last_block") -> str:
    """Text to embed: ``full`` = the whole (decoded) prompt; ``last_block`` = after the last blank line.

    ``last_block`` drops the few-shot prefix that ARC and Winogrande prompts share, which would
    otherwise dominate MiniLM's 256-token window and make every prompt embed alike.
    """
    text = decode_prompt(prompt).strip()
    if mode == "full":
        return text
    if mode == "last_block":
        return BLOCK_SEPARATOR.split(text.replace("\r\n", "\n").replace("\r", "\n"))[-1].strip()
    raise ValueError(f"text mode must be one of {', '.join(TEXT_MODES)}; got {mode!r}")


def load_prices(path: Path | str) -> dict[str, tuple[float, float]]:
    """``{model: (input, output)}`` in USD per 1k tokens, from ``{model: {"input": x, "output": y}}``."""
    source = Path(path)
    try:
        raw = json.loads(source.read_text(encoding=TEXT_ENCODING))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{source}: cannot read prices ({exc})") from exc
    if not isinstance(raw, dict):
        raise DataError(f"{source}: prices must be a JSON object")
    prices: dict[str, tuple[float, float]] = {}
    for model, entry in raw.items():
        if model.startswith("_"):  # annotations such as "_unit"
            continue
        try:
            pair = (float(entry["input"]), float(entry["output"]))
        except (TypeError, KeyError, ValueError) as exc:
            raise DataError(f"{source}: {model!r} needs numeric 'input' and 'output' prices ({exc!r})") from exc
        if not all(math.isfinite(p) and p >= 0 for p in pair):
            raise DataError(f"{source}: {model!r} prices must be finite and >= 0; got {pair}")
        prices[model] = pair
    if not prices:
        raise DataError(f"{source}: no model prices found")
    return prices


def load_labelled(
    paths: Sequence[Path | str], text_mode: TextMode = "last_block", price_models: Collection[str] = ()
) -> LabelledSet:
    """Concatenate labelled files (CSV, or JSONL by suffix); every file must have the same set of models.

    Models are the columns with a ``<model>|total_cost`` twin, plus the columns named in ``price_models``
    (a price list: then no per-row cost is needed; missing costs are NaN).
    """
    if not paths:
        raise DataError("no training files given")
    if text_mode not in TEXT_MODES:
        raise ValueError(f"text mode must be one of {', '.join(TEXT_MODES)}; got {text_mode!r}")
    models: tuple[str, ...] | None = None
    texts: list[str] = []
    tasks: list[str] = []
    sample_ids: list[str] = []
    correct_rows: list[list[float]] = []
    cost_rows: list[list[float]] = []
    sources: list[SourceFile] = []
    for path in map(Path, paths):
        if path.suffix.lower() == JSON_SUFFIX:  # read as CSV it would only fail on a missing 'prompt' column
            raise DataError(f"{path}: give CSV, or JSON Lines ({', '.join(JSONL_SUFFIXES)}: one object a line)")
        rows, file_models = _read_jsonl(path, price_models) if _is_jsonl(path) else _read_csv(path, price_models)
        digest = file_sha256(path)
        if any(source.sha256 == digest for source in sources):  # its rows twice: in both train and test of --cv
            raise DataError(f"{path}: the same content as an earlier --data file")
        if models is None:
            models = file_models
        elif file_models != models:
            raise DataError(f"{path}: models {list(file_models)} differ from earlier files' {list(models)}")
        for line, row in rows:
            if not row[PROMPT_COLUMN].strip():  # nothing to embed (the service refuses such a prompt too)
                raise DataError(f"{path}:{line}: the prompt is empty")
            text = extract_text(row[PROMPT_COLUMN], text_mode)
            if not text:  # e.g. its last message is empty, or its last block is (a template's blank line)
                hint = "; try --text full" if text_mode == "last_block" else ""
                raise DataError(f"{path}:{line}: nothing to embed in the prompt with --text {text_mode}{hint}")
            texts.append(text)
            tasks.append(row.get(TASK_COLUMN) or "")
            sample_ids.append(row.get(SAMPLE_ID_COLUMN) or "")
            correct_rows.append([_parse_outcome(row.get(m, ""), path, line, m) for m in models])
            cost_rows.append([_parse_cost(row.get(m + COST_SUFFIX, ""), path, line, m) for m in models])
        sources.append(SourceFile(name=path.name, sha256=digest, rows=len(rows)))
    assert models is not None
    if not texts:
        raise DataError(f"{', '.join(str(p) for p in paths)}: no data rows")
    num_models = len(models)
    return LabelledSet(
        texts=texts,
        task=tasks,
        sample_ids=sample_ids,
        models=models,
        correct=np.array(correct_rows, dtype=np.float32).reshape(-1, num_models),
        cost_usd=np.array(cost_rows, dtype=np.float64).reshape(-1, num_models),
        sources=tuple(sources),
        text_mode=text_mode,
    )


def require_outcomes(labelled: LabelledSet, models: Sequence[str] | None = None) -> None:
    """Raise :class:`DataError` naming each of ``models`` (default: all) that has no outcome in any row (checked
    before the minutes of embedding)."""
    wanted = labelled.models if models is None else tuple(models)
    absent = [m for m in wanted if m not in labelled.models]
    if absent:
        files = ", ".join(source.name for source in labelled.sources)
        raise DataError(f"{files}: no outcome column for model(s) {', '.join(map(repr, absent))}")
    observed = (~np.isnan(labelled.correct)).sum(axis=0)
    empty = [m for m in wanted if observed[labelled.models.index(m)] == 0]
    if empty:
        files = ", ".join(source.name for source in labelled.sources)
        raise DataError(
            f"{files}: no outcome for model(s) {', '.join(map(repr, empty))} in any of the "
            f"{labelled.num_rows} rows (every cell empty or null)"
        )


# The loader's first name, from when it read RouterBench CSV only.

Rows = list[tuple[int, dict[str, str]]]


def _is_jsonl(path: Path) -> bool:
    return path.suffix.lower() in JSONL_SUFFIXES


def _model_columns(header: Sequence[str], price_models: Collection[str], path: Path) -> tuple[str, ...]:
    """Sorted model names: columns with a cost twin, and priced columns."""
    if PROMPT_COLUMN not in header:
        raise DataError(f"{path}: no {PROMPT_COLUMN!r} column")
    present = set(header)
    reserved = {PROMPT_COLUMN, TASK_COLUMN, SAMPLE_ID_COLUMN}
    candidates = (c for c in present if c and "|" not in c and c not in reserved)
    models = sorted(c for c in candidates if c + COST_SUFFIX in present or c in price_models)
    if not models:
        priced = f"; priced: {', '.join(sorted(price_models))}" if price_models else ""
        raise DataError(
            f"{path}: no model columns (a model column X needs a matching 'X{COST_SUFFIX}' column or a price{priced})"
        )
    return tuple(models)


def _read_csv(path: Path, price_models: Collection[str] = ()) -> tuple[Rows, tuple[str, ...]]:
    """Rows with their line numbers, and the sorted model names found in the header."""
    try:
        with path.open(newline="", encoding=TEXT_ENCODING) as fh:
            reader = csv.DictReader(fh)
            header = list(reader.fieldnames or [])
            rows = [(reader.line_num, row) for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise DataError(f"{path}: cannot read CSV ({exc})") from exc
    repeated = sorted({name for name, count in Counter(header).items() if count > 1})
    if repeated:  # DictReader would silently keep the last of them
        raise DataError(f"{path}: column(s) named more than once in the header: {', '.join(map(repr, repeated))}")
    models = _model_columns(header, price_models, path)
    for line, row in rows:
        if None in row or any(value is None for value in row.values()):
            raise DataError(f"{path}:{line}: row length differs from the header")
    return rows, models


def _read_jsonl(path: Path, price_models: Collection[str] = ()) -> tuple[Rows, tuple[str, ...]]:
    """JSON objects, one per non-blank line; values become the strings a CSV cell would hold."""
    rows: Rows = []
    header: dict[str, None] = {}
    try:
        with path.open(encoding=TEXT_ENCODING) as fh:
            for line, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                value = json.loads(text, object_pairs_hook=_unique_keys)
                if not isinstance(value, dict):
                    raise DataError(f"{path}:{line}: each line must be a JSON object")
                rows.append((line, {str(k): _cell(v, path, line) for k, v in value.items()}))
                header.update(dict.fromkeys(map(str, value)))
    except _DuplicateKey as exc:
        raise DataError(f"{path}:{line}: key {exc.args[0]!r} appears more than once in the object") from None
    except json.JSONDecodeError as exc:  # its position is within the line: name the file's line
        raise DataError(f"{path}:{line}: not JSON ({exc.msg}, column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{path}:{line}: JSON nested too deeply") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read JSONL ({exc})") from exc
    models = _model_columns(list(header), price_models, path)
    for line, row in rows:
        if PROMPT_COLUMN not in row:
            raise DataError(f"{path}:{line}: no {PROMPT_COLUMN!r}")
    return rows, models


class _DuplicateKey(Exception):
    """A JSON object names one key twice (``json`` would silently keep the last value)."""


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    keys = [key for key, _ in pairs]
    repeated = next((key for key, count in Counter(keys).items() if count > 1), None)
    if repeated is not None:
        raise _DuplicateKey(repeated)
    return dict(pairs)


def _cell(value: object, path: Path, line: int) -> str:
    """A JSON value as CSV text: null -> empty, true/false -> 1/0, numbers and strings as written."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int | float | str):
        return str(value)
    raise DataError(f"{path}:{line}: values must be strings, numbers, booleans or null; got {type(value).__name__}")


def _parse_outcome(value: str, path: Path, line: int, model: str) -> float:
    """``1.0``/``0.0`` (partial credit in between allowed); empty means no outcome (NaN)."""
    if not value.strip():
        return math.nan
    try:
        outcome = float(value)
    except ValueError:
        raise DataError(f"{path}:{line}: {model!r} outcome {value!r} is not a number") from None
    if math.isnan(outcome):  # Python's json.dumps writes a missing float so
        raise DataError(f"{path}:{line}: {model!r} outcome is NaN: leave the cell empty (or null) for no outcome")
    if not 0.0 <= outcome <= 1.0:
        raise DataError(f"{path}:{line}: {model!r} outcome {outcome} outside [0, 1]")
    return outcome


def _parse_cost(value: str, path: Path, line: int, model: str) -> float:
    if not value.strip():
        return math.nan
    try:
        cost = float(value)
    except ValueError:
        raise DataError(f"{path}:{line}: {model!r} cost {value!r} is not a number") from None
    if not math.isfinite(cost) or cost < 0:
        raise DataError(f"{path}:{line}: {model!r} cost {cost} must be finite and >= 0")
    return cost
