"""The leaderboard's rules: defined once (rules.py), each violation named by key and value."""

from __future__ import annotations

import re

from flowertune_llm import rules
from tests.helpers import ROOT, default_run_config

HUB = "HuggingFaceTB/SmolLM2-135M-Instruct"


def test_only_rules_py_defines_the_rule_constants_and_the_default_static_dataset_is_the_current_rule() -> None:
    definitions = re.compile(r"^\s*[A-Z_]*\s*=\s*.*(flwrlabs/alpaca-gpt4|vicgalle/alpaca-gpt4|200_000|\b52_002\b)|"
                             r"^[A-Z_]*(NUM_SUPERNODES|COMM_BUDGET)\w*\s*=", re.M)
    defined = {p.relative_to(ROOT).as_posix() for p in (ROOT / "flowertune_llm").rglob("*.py")
               if definitions.search(p.read_text())}
    assert defined == {"flowertune_llm/rules.py"}
    assert default_run_config()["static.dataset.name"] == rules.DATASET == "flwrlabs/alpaca-gpt4"


def test_a_run_on_the_rules_gets_no_violation_and_each_break_is_named() -> None:
    assert rules.run_violations(rules.DATASET, HUB, 20, 747.07) == []
    assert rules.run_violations(rules.DATASET, HUB) == []  # node count and communication not known yet
    (old,) = rules.run_violations("vicgalle/alpaca-gpt4", HUB)
    assert "the rule before 2025-04-08" in old and "'flwrlabs/alpaca-gpt4'" in old
    (gguf,) = rules.run_violations(rules.DATASET, "/models/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gguf.startswith("model.name='/models/SmolLM2-135M-Instruct.Q4_1.gguf': a GGUF import")
    (nodes,) = rules.run_violations(rules.DATASET, HUB, num_nodes=2)
    assert nodes.startswith("num_nodes=2:")
    (comm,) = rules.run_violations(rules.DATASET, HUB, 20, 200_000.5)
    assert comm.startswith("communication=200,000.50 MiB: over the leaderboard's budget")


def full_summary(**changes: object) -> dict:
    """A results.json summary of a rule-abiding evaluation, with changes."""
    summary = {"quantization": 4, "split": "test", "limit": None, "batching": "exact",
               "questions_sha256": rules.TEST_QUESTIONS_SHA256,
               "categories": {c: {"total": n} for c, n in rules.EVAL_COUNTS.items()}}
    return {**summary, **changes}


def test_an_evaluation_must_be_4bit_on_the_full_test_split_and_exact() -> None:
    assert rules.evaluation_violations(full_summary()) == []
    assert rules.evaluation_violations(full_summary(batching="one-at-a-time")) == []
    assert [v.split("=")[0] for v in rules.evaluation_violations(full_summary(
        quantization=8, split="validation", limit=10, batching="inexact"))] == ["quantization", "split", "limit",
                                                                                 "batching"]
    partial = full_summary(categories={"stem": {"total": 3153}, "social_sciences": {"total": 3077}})
    assert rules.evaluation_violations(partial) == [
        "categories.humanities.total=None: the full test split has 4705 questions"]


def test_the_official_question_set_hash_is_the_offline_test_splits_and_one_changed_answer_changes_it(tmp_path) -> None:  # noqa: ANN001
    """The leaderboard's questions by content: the official hash recomputed from the offline MMLU test split; the
    same file with ONE answer changed (saved under a name that says test) has the same counts and another hash,
    and its evaluation is refused naming questions_sha256."""
    import json

    from flowertune_llm.evaluate.data import by_category, load_questions, question_set_sha256, split_of
    from tests.helpers import MMLU_DIR

    def scored(path) -> tuple[str, dict]:  # noqa: ANN001
        questions = by_category(load_questions(str(path)), list(rules.EVAL_CATEGORIES))
        return question_set_sha256(q for qs in questions.values() for q in qs), {c: len(q) for c, q in questions.items()}

    official, counts = scored(MMLU_DIR / "mmlu_test.jsonl")
    assert official == rules.TEST_QUESTIONS_SHA256 and counts == rules.EVAL_COUNTS
    lines = (MMLU_DIR / "mmlu_test.jsonl").read_text().rstrip("\n").split("\n")  # not splitlines: rows hold \x0c
    row = json.loads(lines[0])
    row["answer"] = "ABCD"[("ABCD".index(row["answer"]) + 1) % 4]
    fixed = tmp_path / "mmlu_test_fixed.jsonl"
    fixed.write_text("\n".join([json.dumps(row), *lines[1:]]) + "\n")
    changed, changed_counts = scored(fixed)
    assert changed_counts == counts and changed != official and split_of(str(fixed)) == "test"
    (line,) = rules.evaluation_violations(full_summary(questions_sha256=changed))
    assert line.startswith(f"questions_sha256='{changed}': not the questions of MMLU's test split")


def test_a_files_split_is_a_word_of_its_name_not_a_substring() -> None:
    from flowertune_llm.evaluate.data import split_of

    assert split_of(__file__.replace("test_rules.py", "x")) == "test"  # not a file: the split asked for
    for name, split in (("mmlu_val_latest.jsonl", "validation"), ("mmlu_test.jsonl", "test"),
                        ("contest-results.jsonl", "unknown"), ("mmlu_dev.csv", "dev"), ("val_and_test.jsonl", "unknown")):
        path = __import__("pathlib").Path("/tmp") / name
        path.write_text("")
        try:
            assert split_of(str(path)) == split, name
        finally:
            path.unlink()
