"""The MMLU protocol without a model: the prompt string, the parser, the categories and counts, the data forms."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from flowertune_llm.evaluate.data import EvalDataError, by_category, load_questions
from flowertune_llm.evaluate.protocol import (
    FULL_TEST_COUNTS,
    MMLU_CATEGORIES,
    format_mcq,
    is_correct,
    mcq_prompt,
    parse_prediction,
)
from tests.helpers import MMLU_DIR

MMLU_TEST = MMLU_DIR / "mmlu_test.jsonl"



def test_prompt_is_the_protocol_string() -> None:
    assert mcq_prompt("What is 2+2", ["1", "2", "3", "4"]) == (
        "<|im_start|>question\n"
        "Answer the following multiple choice question.\n"
        "Question: What is 2+2?\n\nOptions:\nA. 1\nB. 2\nC. 3\nD. 4\n"
        "The answer is:\n"
        "<|im_end|>\n<|im_start|>answer\n"
    )


@pytest.mark.parametrize(
    ("question", "shown"), [("Why", "Why?"), ("Why?", "Why?"), ("Stop.", "Stop."), ("a b", "a b?")]
)
def test_question_mark_rule(question: str, shown: str) -> None:
    assert format_mcq(question, ["w", "x", "y", "z"]).startswith(f"Question: {shown}\n\nOptions:\n")


@pytest.mark.parametrize(
    ("output", "gold", "prediction", "correct"),
    [
        ("Answer", "A", "a", True),  # first letter of the cleaned text
        ("B", "B", "b", True),
        ("b", "B", "b", True),
        (" (C) ", "C", "c", True),
        ("\n", "A", "\n", False),  # nothing left: raw output compared with gold
        ("", "A", "", False),  # "<|im_end|>" decoded with skip_special_tokens
        ("The", "A", "the", False),  # 't' is no option letter: raw output, wrong
        ("x\n## C\nmore", "C", "c", True),  # text after "\n##" up to the next newline
        ("\n##D", "D", "d", True),
        ("é b", "B", "b", True),  # non-ASCII dropped
        ("yes", "A", "yes", False),
        ("e", "E", "e", True),
    ],
)
def test_answer_parser_branches(output: str, gold: str, prediction: str, correct: bool) -> None:
    assert parse_prediction(output) == prediction
    assert is_correct(output, gold) is correct


def test_protocol_categories_match_the_offline_mmlu_counts() -> None:
    questions = load_questions(str(MMLU_TEST))
    assert len(questions) == 14042
    grouped = by_category(questions, list(MMLU_CATEGORIES))
    counts = {c: len(v) for c, v in grouped.items()}
    assert counts == FULL_TEST_COUNTS
    subjects = [s for subs in MMLU_CATEGORIES.values() for s in subs]
    assert len(subjects) == len(set(subjects)) == 57
    assert set(subjects) == {q.subject for q in questions}
    assert [len(MMLU_CATEGORIES[c]) for c in ("stem", "social_sciences", "humanities")] == [19, 12, 13]


def test_local_forms_jsonl_folder_and_hendrycks_csv(tmp_path: Path) -> None:
    assert len(load_questions(str(MMLU_DIR))) == 14042  # folder: picks *test*.jsonl
    csv_dir = tmp_path / "data" / "test"
    csv_dir.mkdir(parents=True)
    (csv_dir / "anatomy_test.csv").write_text('"What is it",a,b,c,d,C\nSecond one.,e,f,g,h,A\n')
    qs = load_questions(str(tmp_path / "data"))
    assert [(q.subject, q.answer, q.options[2]) for q in qs] == [("anatomy", "C", "c"), ("anatomy", "A", "g")]
    assert len(by_category(qs, ["stem"])["stem"]) == 2


def test_bad_data_and_categories_are_named(tmp_path: Path) -> None:
    with pytest.raises(EvalDataError, match="--category astronomy: unknown"):
        by_category(load_questions(str(MMLU_TEST)), ["stem", "astronomy"])
    bad = tmp_path / "bad_test.jsonl"
    bad.write_text('{"subject": "anatomy", "question": "q"\n')
    with pytest.raises(EvalDataError, match=r"bad_test.jsonl:1: not JSON"):
        load_questions(str(bad))
    with pytest.raises(EvalDataError, match="no such file"):
        load_questions(str(tmp_path / "missing.jsonl"))
    incomplete = tmp_path / "inc_test.jsonl"
    incomplete.write_text(json.dumps({"subject": "anatomy", "question": "q", "A": "1", "answer": "A"}) + "\n")
    with pytest.raises(EvalDataError, match="inc_test.jsonl:1: bad MMLU record"):
        load_questions(str(incomplete))
