"""Every prompt format in one place, imported by training and evaluation alike.

- ``alpaca``: the FlowerTune reference format (instruction, optional input, "### Response:").
- ``chat``: the model's own chat template (TRL's conversational prompt/completion rows).
- ``qa``: the MMLU protocol's question/answer wrapper, so training uses the very format the
  model is later asked in.
"""

from __future__ import annotations

from typing import Any

PROMPT_TEMPLATES = ("alpaca", "chat", "qa")

#: The Alpaca prompt. Unlike the original FlowerTune template, the ``input`` text is kept.
PROMPT_PREAMBLE = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request."
)
#: The FlowerTune General-NLP evaluation's wrapper around a question (and the ``qa`` format's).
QA_WRAPPER = "<|im_start|>question\n{question}<|im_end|>\n<|im_start|>answer\n"


def build_prompt(instruction: str, input_text: str = "") -> str:
    """The Alpaca prompt up to and including the response header (training and inference)."""
    parts = [PROMPT_PREAMBLE, f"### Instruction:\n{instruction.strip()}"]
    if input_text and input_text.strip():
        parts.append(f"### Input:\n{input_text.strip()}")
    parts.append("### Response:\n")
    return "\n\n".join(parts)


def qa_prompt(question: str) -> str:
    """A question in the protocol's wrapper, ending where the model's answer starts."""
    return QA_WRAPPER.format(question=question)


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
        return {"prompt": build_prompt(instruction, input_text), "completion": output}
    if template == "qa":  # the protocol's questions end with a newline before <|im_end|>
        return {"prompt": qa_prompt(user_text(instruction, input_text) + "\n"), "completion": output}
    if template == "chat":
        return {
            "prompt": [{"role": "user", "content": user_text(instruction, input_text)}],
            "completion": [{"role": "assistant", "content": output}],
        }
    raise ValueError(f"prompt template {template!r}: expected one of {', '.join(PROMPT_TEMPLATES)}")
