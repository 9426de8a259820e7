"""Training's prompt formats, built on the MMLU protocol (evaluate/protocol.py, a leaf) and never the other way round.

- ``alpaca``: the FlowerTune reference format (instruction, optional input, "### Response:").
- ``chat``: the model's own chat template (TRL's conversational prompt/completion rows).
- ``qa``: the MMLU protocol's question/answer wrapper, so training uses the very format the
  model is later asked in.
- ``mcq``: with probability ``train.mcq-fraction`` a row becomes a multiple-choice question built
  from the client's own partition (its output and three other rows' outputs as options A-D, in the
  evaluation's own prompt, the gold letter as the completion); the other rows stay ``qa``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


def mcq_examples(
    rows: Sequence[dict[str, str]],
    seed: int,
    partition_id: int,
    fraction: float,
    fits: Callable[[str, str], bool],
    shorten: Callable[[str, int], str],
) -> list[dict[str, Any]]:
    """The ``mcq`` template of one partition: each row as a multiple-choice example or in ``qa`` form.

    Deterministic given (seed, partition_id) and the rows: every random draw of a row is made
    whether or not the row becomes a question, so one row's fate never shifts another's. A
    question's options are its own output and the outputs of three other rows of the partition
    (distinct texts, each on one line), in the evaluation protocol's prompt (`evaluate.protocol.mcq_prompt`), with
    the gold position uniform over A-D; the completion is the gold letter (TRL adds the end token).
    `fits(prompt, completion)` says whether an example fits `train.seq-length`; when it does not,
    every option is cut to the same number of tokens with `shorten(text, tokens)`, halving until
    it fits, never the question; a row that still does not fit stays in ``qa`` form.
    """
    rng = np.random.default_rng([seed, partition_id, 0x6D6371])  # "mcq"
    outputs = [one_line(row["output"]) for row in rows]  # an option is one line, as in MMLU
    examples = []
    for i, row in enumerate(rows):
        chosen = rng.random() < fraction
        order = rng.permutation(len(rows))  # candidate distractors, in a seeded order
        gold = int(rng.integers(len(LETTERS)))
        distractors = []
        for j in order:
            if j != i and outputs[j] and outputs[j] != outputs[i] and outputs[j] not in distractors:
                distractors.append(outputs[j])
            if len(distractors) == len(LETTERS) - 1:
                break
        qa = to_prompt_completion(row, "qa")
        if not chosen or len(distractors) < len(LETTERS) - 1 or not outputs[i]:
            examples.append(qa)
            continue
        options = distractors[:gold] + [outputs[i]] + distractors[gold:]
        question = user_text(row["instruction"], row.get("input") or "")
        example = {"prompt": mcq_prompt(question, options), "completion": LETTERS[gold]}
        limit = max(len(o) for o in options)  # tokens never outnumber characters
        while not fits(example["prompt"], example["completion"]) and limit > 1:
            limit //= 2
            cut = [shorten(o, limit) for o in options]
            example = {"prompt": mcq_prompt(question, cut), "completion": LETTERS[gold]}
        examples.append(example if fits(example["prompt"], example["completion"]) else qa)
    return examples
