"""The FlowerTune General-NLP MMLU protocol: categories and counts, letters, prompt, answer parsing (defined once).

A leaf: it imports nothing from this package, so training's prompt formats (prompts.py), the
rules and the evaluation all build on it without a cycle.
"""

from __future__ import annotations

import re

#: The option letters, in order.
LETTERS = ("A", "B", "C", "D")
#: The same as the parser returns them (lower case): a "valid letter" is one of these.
ANSWER_LETTERS = tuple(letter.lower() for letter in LETTERS)
#: The evaluation's wrapper around a question (also the `qa` training format's).
QA_WRAPPER = "<|im_start|>question\n{question}<|im_end|>\n<|im_start|>answer\n"

#: The protocol's own category lists (not Hendrycks'); the leaderboard averages the first three.
MMLU_CATEGORIES: dict[str, tuple[str, ...]] = {
    "stem": (
        "abstract_algebra", "anatomy", "astronomy", "college_biology", "college_chemistry",
        "college_computer_science", "college_mathematics", "college_physics",
        "computer_security", "conceptual_physics", "electrical_engineering",
        "elementary_mathematics", "high_school_biology", "high_school_chemistry",
        "high_school_computer_science", "high_school_mathematics", "high_school_physics",
        "high_school_statistics", "machine_learning",
    ),
    "social_sciences": (
        "econometrics", "high_school_geography", "high_school_government_and_politics",
        "high_school_macroeconomics", "high_school_microeconomics", "high_school_psychology",
        "human_sexuality", "professional_psychology", "public_relations", "security_studies",
        "sociology", "us_foreign_policy",
    ),
    "humanities": (
        "formal_logic", "high_school_european_history", "high_school_us_history",
        "high_school_world_history", "international_law", "jurisprudence",
        "logical_fallacies", "moral_disputes", "moral_scenarios", "philosophy", "prehistory",
        "professional_law", "world_religions",
    ),
    "other": (
        "business_ethics", "clinical_knowledge", "college_medicine", "global_facts",
        "human_aging", "management", "marketing", "medical_genetics", "miscellaneous",
        "nutrition", "professional_accounting", "professional_medicine", "virology",
    ),
}
LEADERBOARD_CATEGORIES = ("stem", "social_sciences", "humanities")
#: Questions per category in the full MMLU test split (14,042 in all): what a leaderboard evaluation scores.
FULL_TEST_COUNTS = {"stem": 3153, "social_sciences": 3077, "humanities": 4705, "other": 3107}
SUBJECT_TO_CATEGORY = {s: c for c, subjects in MMLU_CATEGORIES.items() for s in subjects}

SYSTEM_LINE = "Answer the following multiple choice question."
USER_LINE = "The answer is:"
VALID_PREDICTIONS = (*ANSWER_LETTERS, "e", "yes", "no")


def format_mcq(question: str, options: list[str]) -> str:
    """'Question: ...?' followed by lettered options, as the protocol writes them."""
    if not question.endswith("?") and not question.endswith("."):
        question += "?"
    options_str = "\n".join(f"{chr(65 + i)}. {opt}" for i, opt in enumerate(options))
    return "Question: " + question + "\n\nOptions:\n" + options_str


def qa_prompt(question: str) -> str:
    """A question in the protocol's wrapper, ending where the model's answer starts."""
    return QA_WRAPPER.format(question=question)


def question_text(question: str, options: list[str]) -> str:
    """The instruction lines around the MCQ: the official generation files' `prompt` (no chat wrapper)."""
    return f"{SYSTEM_LINE}\n{format_mcq(question, options)}\n{USER_LINE}\n"


def mcq_prompt(question: str, options: list[str]) -> str:
    """The full model input: `question_text` in the protocol's chat wrapper."""
    return qa_prompt(question_text(question, options))


def parse_prediction(output: str) -> str:
    """Reduce a generation to a letter (or yes/no) when possible, else return it unchanged."""
    raw = output.lower()
    text = raw
    if "\n##" in text:
        text = text.split("\n##")[1].split("\n")[0]
    text = re.sub(r"[^a-zA-Z0-9]", " ", text).strip()
    text = re.sub(" +", " ", text)
    text = text.encode("ascii", "ignore").decode("ascii")
    text = text[:1]
    return text if text in VALID_PREDICTIONS else raw


def is_correct(output: str, gold: str) -> bool:
    """The protocol's scoring: parsed prediction (or raw output) equals the lower-cased gold."""
    return parse_prediction(output) == gold.lower()
