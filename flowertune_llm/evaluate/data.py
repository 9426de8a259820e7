"""MMLU questions (test or validation split) from the hub or local files (Hendrycks CSV or jsonl)."""

from __future__ import annotations

import csv
import hashlib
import json
import random
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from flowertune_llm.evaluate.protocol import LETTERS, MMLU_CATEGORIES, SUBJECT_TO_CATEGORY

DEFAULT_DATA = "cais/mmlu"
#: Split name -> (jsonl glob, Hendrycks CSV glob) that find its files in a local folder.
SPLIT_FILES = {"test": ("*test*.jsonl", "*_test.csv"), "validation": ("*val*.jsonl", "*_val.csv")}


class EvalDataError(ValueError):
    """The MMLU data cannot be read; the message names the path or id."""


@dataclass(frozen=True)
class Question:
    """One MMLU item in the protocol's terms."""

    subject: str
    question: str
    options: tuple[str, str, str, str]
    answer: str  # "A".."D"


def _from_record(rec: dict, where: str) -> Question:
    try:
        answer = rec["answer"]
        if isinstance(answer, int):
            answer = LETTERS[answer]
        answer = str(answer).strip().upper()
        if answer not in LETTERS:
            raise ValueError(f"answer {answer!r} is not one of A-D")
        if "choices" in rec:
            options = tuple(str(c) for c in rec["choices"])
        else:
            options = tuple(str(rec[letter]) for letter in LETTERS)
        if len(options) != 4:
            raise ValueError(f"{len(options)} options instead of 4")
        return Question(str(rec["subject"]), str(rec["question"]), options, answer)  # type: ignore[arg-type]
    except (KeyError, ValueError, IndexError) as exc:
        raise EvalDataError(f"{where}: bad MMLU record ({type(exc).__name__}: {exc})") from exc


def _read_jsonl(path: Path) -> list[Question]:
    out = []
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if line.strip():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise EvalDataError(f"{path}:{lineno}: not JSON ({exc})") from exc
                out.append(_from_record(rec, f"{path}:{lineno}"))
    return out


def _read_hendrycks_csv(path: Path) -> list[Question]:
    subject = path.stem.removesuffix("_test").removesuffix("_val").removesuffix("_dev")
    out = []
    with open(path, encoding="utf-8", newline="") as fh:
        for lineno, row in enumerate(csv.reader(fh), 1):
            if len(row) != 6:
                raise EvalDataError(f"{path}:{lineno}: expected 6 CSV columns, got {len(row)}")
            rec = {"subject": subject, "question": row[0], "answer": row[5]}
            rec.update(zip(LETTERS, row[1:5]))
            out.append(_from_record(rec, f"{path}:{lineno}"))
    return out


def named(key: str, value: object) -> str:
    """How an error names what the user passed: '--data X' for a flag, "eval.data='X'" for a config key."""
    return f"{key} {value}" if key.startswith("--") else f"{key}={str(value)!r}"


def _local_files(path: Path, split: str, key: str) -> list[Path]:
    if path.is_file():
        return [path]
    jsonl, csv_glob = SPLIT_FILES[split]
    files = sorted(path.rglob(jsonl)) or sorted(path.rglob(csv_glob))
    if not files:
        raise EvalDataError(f"{named(key, path)}: no '{jsonl}' or '{csv_glob.replace('*', '<subject>')}' file found")
    return files


def split_of(data: str, split: str = "test") -> str:
    """Which MMLU split `load_questions(data, split)` reads: the split asked for from a hub id or a folder; for a
    single file, the split its name says as a word of its own ("mmlu_val_latest" is validation, never "la-test"),
    else "unknown". A name is only a label: what identifies the questions is `question_set_sha256`."""
    path = Path(data).expanduser()
    if not path.is_file():
        return split
    words = set(re.split(r"[^a-z]+", path.stem.lower()))
    splits = {"test": "test", "val": "validation", "valid": "validation", "validation": "validation", "dev": "dev"}
    found = {splits[w] for w in words if w in splits}
    return found.pop() if len(found) == 1 else "unknown"


def question_set_sha256(questions: Iterable[Question]) -> str:
    """SHA-256 of a set of questions: the (subject, question, options, answer) rows, in a canonical order (sorted),
    so the same questions from the hub or a local copy hash alike and one changed answer changes it."""
    rows = sorted(json.dumps([q.subject, q.question, list(q.options), q.answer], ensure_ascii=False)
                  for q in questions)
    digest = hashlib.sha256()
    for row in rows:
        digest.update(row.encode())
        digest.update(b"\n")
    return digest.hexdigest()


def load_questions(data: str = DEFAULT_DATA, split: str = "test", key: str = "--data") -> list[Question]:
    """All questions of a split from a hub id, or from a local file (any split) or folder."""
    path = Path(data).expanduser()
    if path.exists():
        questions: list[Question] = []
        for file in _local_files(path, split, key):
            reader = _read_hendrycks_csv if file.suffix == ".csv" else _read_jsonl
            try:
                questions.extend(reader(file))
            except (OSError, UnicodeDecodeError) as exc:
                raise EvalDataError(f"{named(key, file)}: unreadable ({exc})") from exc
        return questions
    if data.startswith((".", "/", "~")) or path.suffix in (".jsonl", ".csv", ".json"):
        raise EvalDataError(f"{named(key, data)}: no such file or folder")
    from datasets import load_dataset

    from flowertune_llm.hub import require_hub_or_cache

    require_hub_or_cache(key, data, "dataset")
    try:
        dataset = load_dataset(data, "all", split=split)
    except Exception as exc:
        raise EvalDataError(
            f"{named(key, data)}: cannot load its {split} split from the hub or cache ({type(exc).__name__}: {exc}); "
            "pass a local MMLU folder or jsonl file"
        ) from exc
    return [_from_record(rec, data) for rec in dataset]


def by_category(
    questions: list[Question], categories: list[str], limit: int | None = None
) -> dict[str, list[Question]]:
    """The questions of each requested category, in source order (first `limit` if given)."""
    unknown = [c for c in categories if c not in MMLU_CATEGORIES]
    if unknown:
        raise EvalDataError(
            f"--category {','.join(unknown)}: unknown; choose from {', '.join(MMLU_CATEGORIES)}"
        )
    out: dict[str, list[Question]] = {c: [] for c in categories}
    for q in questions:
        cat = SUBJECT_TO_CATEGORY.get(q.subject)
        if cat in out:
            out[cat].append(q)
    for cat, items in out.items():
        if not items:
            raise EvalDataError(f"category {cat!r}: no questions in the data")
        if limit is not None:
            out[cat] = items[:limit]
    return out


def stratified_sample(
    questions: dict[str, list[Question]], total: int, seed: int = 0
) -> dict[str, list[Question]]:
    """`total // categories` questions of each category, drawn with a fixed seed, in source order.

    A category with fewer questions keeps them all. The same data and seed give the same
    questions every time, so evaluations over rounds (and of a resumed run) stay comparable.
    """
    quota = max(1, total // len(questions))
    out = {}
    for cat, items in questions.items():
        keep = sorted(random.Random(f"{seed}:{cat}").sample(range(len(items)), min(quota, len(items))))
        out[cat] = [items[i] for i in keep]
    return out
