"""Training's prompt formats, built on the MMLU protocol (evaluate/protocol.py, a leaf) and never the other way round.

- ``alpaca``: the FlowerTune reference format (instruction, optional input, "### Response:").
- ``chat``: the model's own chat template (TRL's conversational prompt/completion rows).
- ``qa``: the MMLU protocol's question/answer wrapper, so training uses the very format the
  model is later asked in.
- ``mcq``: with probability ``train.mcq-fraction`` a row becomes a multiple-choice question built
  from the client's own partition (its output and three other rows' outputs as options A-D, in the
  evaluation's own prompt, the gold letter as the completion), optionally in all four cyclic
  rotations (``train.mcq-rotations``) and with options like MMLU's (``train.mcq-options``); the
  other rows stay ``qa``.
"""

from __future__ import annotations

import heapq
import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from flowertune_llm.evaluate.protocol import LETTERS, mcq_prompt, qa_prompt

PROMPT_TEMPLATES = ("alpaca", "chat", "qa", "mcq")

#: The Alpaca prompt. Unlike the original FlowerTune template, the ``input`` text is kept.
PROMPT_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt up to and including the response header (training and inference)."""
    parts = [PROMPT_PREAMBLE, f"### Instruction:\n{instruction.strip()}"]
    if input_text and input_text.strip():
        parts.append(f"### Input:\n{input_text.strip()}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def user_text(instruction: str, input_text: str = "") -> str:
    """The instruction, plus the input after a blank line when there is one."""
    text = instruction.strip()
    if input_text and input_text.strip():
        text += "\n\n" + input_text.strip()
    return text


def to_prompt_completion(row: dict[str, str], template: str = "alpaca") -> dict[str, Any]:
    """An alpaca row in TRL's prompt-completion form for `template` (loss on the completion only).

    TRL appends the end token (EOS, ``<|im_end|>`` for SmolLM2) to a plain completion; a chat
    completion ends with the template's own end-of-turn.
    """
    instruction, input_text, output = row["instruction"], row.get("input") or "", row["output"].strip()
    if template == "alpaca":
        return {"prompt": alpaca_prompt(instruction, input_text), "completion": output}
    if template == "qa":  # the protocol's questions end with a newline before <|im_end|>
        return {"prompt": qa_prompt(user_text(instruction, input_text) + "\n"), "completion": output}
    if template == "chat":
        return {
            "prompt": [{"role": "user", "content": user_text(instruction, input_text)}],
            "completion": [{"role": "assistant", "content": output}],
        }
    raise ValueError(f"prompt template {template!r}: expected one of {', '.join(PROMPT_TEMPLATES)}")


def one_line(text: str) -> str:
    """Whitespace (newlines included) collapsed to single spaces: how a multi-line output stands as an option."""
    return " ".join(text.split())


#: `train.mcq-options`: where a question's distractors come from and how long its options are.
MCQ_OPTIONS = ("random", "similar")
#: Options like MMLU's (`similar`): at most this many tokens (MMLU's median option is 4 words).
SHORT_OPTION_TOKENS = 20
#: Words that say nothing about an instruction's topic (left out of the similarity).
_STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from given how i in into is it its me of on or that the this to "
    "what when where which who why will with you your".split()
)


def first_sentence(text: str) -> str:
    """The text up to its first sentence end (". ", "! ", "? "; not a list number's "1. "), on one line: an option
    as short as MMLU's."""
    text = one_line(text)
    match = re.search(r"(?<=[^0-9\s][.!?])\s", text)
    return text[: match.start()] if match else text


#: How many candidate distractors `similar_rows` keeps per row (a question needs 3; the rest cover duplicates).
SIMILAR_KEEP = 16
#: Words in more rows than this are too common to tell rows apart (and their posting lists would make the cost
#: grow with the square of a large partition's rows); a 20-node partition's 5% (130 of 2,600) stays below it.
SIMILAR_MAX_DF = 200


def _similar_fallback(n: int, seed: int, partition_id: int) -> np.ndarray:
    """The seeded order of rows that ties and rows sharing nothing follow (`similar_rows`, `mcq_examples`)."""
    return np.random.default_rng([seed, partition_id, 0x73696D]).permutation(n)  # "sim"


def similar_rows(instructions: Sequence[str], seed: int, partition_id: int, keep: int = SIMILAR_KEEP) -> list[list[int]]:
    """For each row, the `keep` other rows whose instructions share most with it (rarest words weigh most).

    Score = sum of log(n / df) over the words two instructions share (stop words and words of one
    row left out; words in more than max(5%, 50) rows, or `SIMILAR_MAX_DF`, skipped: the cost stays
    near-linear in the rows);
    ties and rows sharing nothing follow a seeded order (`_similar_fallback`), so the result is a
    function of (instructions, seed, partition) alone. Only `keep` per row are kept: memory grows
    with the rows, not their square (docs/internals.md has the figures for a 26,000-row partition).
    """
    n = len(instructions)
    words = [set(re.findall(r"[a-z0-9]+", text.lower())) - _STOP_WORDS for text in instructions]
    df = Counter(w for ws in words for w in ws)
    max_df = max(50, min(n // 20, SIMILAR_MAX_DF))
    postings: dict[str, list[int]] = {}
    for i, ws in enumerate(words):
        for w in ws:
            if 1 < df[w] <= max_df:
                postings.setdefault(w, []).append(i)
    fallback = _similar_fallback(n, seed, partition_id)
    rank = np.empty(n, dtype=np.int64)
    rank[fallback] = np.arange(n)
    ranked = []
    for i, ws in enumerate(words):
        scores: Counter[int] = Counter()
        for w in ws:
            weight = math.log(n / df[w]) if w in postings else 0.0
            for j in postings.get(w, ()):
                scores[j] += weight
        scores.pop(i, None)
        close = heapq.nsmallest(keep, scores, key=lambda j: (-round(scores[j], 9), rank[j]))
        if len(close) < keep:
            seen = set(close)
            for j in fallback:
                if len(close) >= min(keep, n - 1):
                    break
                if j != i and j not in seen:
                    close.append(int(j))
        ranked.append(close)
    return ranked


def rotations(options: Sequence[str], gold: int) -> list[tuple[list[str], int]]:
    """The four cyclic rotations of a question's options: (options, gold index) with the gold at A, B, C, D."""
    k = len(options)
    return [([options[(i - r + gold) % k] for i in range(k)], r) for r in range(k)]


def mcq_examples(
    rows: Sequence[dict[str, str]],
    seed: int,
    partition_id: int,
    fraction: float,
    fits: Callable[[str, str], bool],
    shorten: Callable[[str, int], str],
    rotate: bool = False,
    options: str = "random",
) -> list[dict[str, Any]]:
    """The ``mcq`` template of one partition: each row as multiple-choice example(s) or in ``qa`` form.

    Deterministic given (seed, partition_id) and the rows: every random draw of a row is made
    whether or not the row becomes a question, so one row's fate never shifts another's. A
    question's options are its own output and three other rows' outputs (distinct texts, each on
    one line), in the evaluation protocol's prompt (`evaluate.protocol.mcq_prompt`); the completion
    is the gold letter (TRL adds the end token). `options="random"`: distractors from rows in a
    seeded order, whole; `"similar"`: from the rows whose instructions share most with this one
    (`similar_rows`), every option cut to its first sentence and `SHORT_OPTION_TOKENS` tokens.
    Without `rotate` the gold position is drawn uniformly; with it the row gives four examples,
    its options' cyclic rotations with the gold at A, B, C and D, one after another.
    `fits(prompt, completion)` says whether an example fits `train.seq-length`; when one does not,
    every option is cut to the same number of tokens with `shorten(text, tokens)`, halving until
    all fit, never the question; a row that still does not fit stays in ``qa`` form.
    Every example carries `mcq_row` (the row's index) and `mcq_rotation` (0-3 for a rotation of a
    question, -1 otherwise): the trainer keeps a row's rotations together (`schedule.rotation_order`).
    """
    if options not in MCQ_OPTIONS:
        raise ValueError(f"mcq options {options!r}: expected one of {', '.join(MCQ_OPTIONS)}")
    rng = np.random.default_rng([seed, partition_id, 0x6D6371])  # "mcq"
    if options == "similar":
        outputs = [shorten(first_sentence(row["output"]), SHORT_OPTION_TOKENS) for row in rows]
        neighbours = similar_rows([user_text(r["instruction"], r.get("input") or "") for r in rows], seed, partition_id)
        fallback = _similar_fallback(len(rows), seed, partition_id)
    else:
        outputs = [one_line(row["output"]) for row in rows]  # an option is one line, as in MMLU
        neighbours = None
    examples = []
    for i, row in enumerate(rows):
        chosen = rng.random() < fraction
        if neighbours is None:
            order: Iterable[int] = rng.permutation(len(rows))  # candidate distractors
        else:  # the closest rows, then (only if those are used up by duplicates) the seeded order
            kept = set(neighbours[i])
            order = itertools.chain(neighbours[i], (j for j in fallback if j not in kept))
        gold = int(rng.integers(len(LETTERS)))
        distractors: list[str] = []
        for j in order:
            if j != i and outputs[j] and outputs[j] != outputs[i] and outputs[j] not in distractors:
                distractors.append(outputs[j])
            if len(distractors) == len(LETTERS) - 1:
                break
        qa = {**to_prompt_completion(row, "qa"), "mcq_row": i, "mcq_rotation": -1}
        if not chosen or len(distractors) < len(LETTERS) - 1 or not outputs[i]:
            examples.append(qa)
            continue
        question = user_text(row["instruction"], row.get("input") or "")
        base = distractors[:gold] + [outputs[i]] + distractors[gold:]
        forms = rotations(base, gold) if rotate else [(base, gold)]

        built = _mcq_forms(question, base, forms, i, rotate, None)
        limit = max(len(o) for o in base)  # tokens never outnumber characters
        while not all(fits(e["prompt"], e["completion"]) for e in built) and limit > 1:
            limit //= 2
            built = _mcq_forms(question, base, forms, i, rotate, [shorten(o, limit) for o in base])
        examples.extend(built if all(fits(e["prompt"], e["completion"]) for e in built) else [qa])
    return examples


def _mcq_forms(question: str, base: list[str], forms: list[tuple[list[str], int]], row: int, rotate: bool,
               cut: list[str] | None) -> list[dict[str, Any]]:
    """A question's example(s): each form's options (cut to `cut`, the same per option, when given) and gold letter."""
    return [{"prompt": mcq_prompt(question, [cut[base.index(o)] if cut else o for o in opts]),
             "completion": LETTERS[g], "mcq_row": row, "mcq_rotation": g if rotate else -1}
            for opts, g in forms]
