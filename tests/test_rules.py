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
