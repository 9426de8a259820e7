"""The scoring loop: every question of every category through the protocol, batched where that is exact."""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm
from transformers import (
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

import flowertune_llm.ml_stack  # noqa: F401  (progress bars quiet, lazy names resolved)
from flowertune_llm.devices import require_protocol_arithmetic
from flowertune_llm.evaluate.batching import SoloAnswers, check_batching
from flowertune_llm.evaluate.data import Question
from flowertune_llm.evaluate.generation import generate, letter_token_ids
from flowertune_llm.evaluate.model import dora_norm_cache
from flowertune_llm.evaluate.protocol import (
    LETTERS,
    is_correct,
    mcq_prompt,
    parse_prediction,
    question_text,
)
from flowertune_llm.evaluate.results import CategoryResult, EvalResult


def _generate_rest(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    new_tokens: list[int],
    batch_size: int,
    solo: SoloAnswers,
    outputs: list[str],
    letter_logits: torch.Tensor,
    letters: list[int],
    show_progress: bool,
) -> None:
    with tqdm(total=len(prompts), initial=len(solo.texts), desc="MMLU", unit="q", disable=not show_progress) as bar:
        for length in sorted(set(new_tokens)):
            sel = [i for i, n in enumerate(new_tokens) if n == length and i not in solo.texts]
            if not sel:
                continue
            texts, logits = generate(model, tokenizer, [prompts[i] for i in sel], length, batch_size, bar, letters)
            for i, text, row in zip(sel, texts, logits):
                outputs[i] = text
                letter_logits[i] = row


def evaluate_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: dict[str, list[Question]],
    batch_size: int = 16,
    show_progress: bool = True,
    allow_inexact_batching: bool = False,
    cache_dora_norms: bool = True,
) -> EvalResult:
    """Run the protocol on each category: generations, scores and answer diagnostics per question."""
    require_protocol_arithmetic(model)  # the guard: no 4-bit layer on the fused bf16 CPU kernel
    start = time.perf_counter()
    items = [(category, q) for category, qs in questions.items() for q in qs]
    prompts = [mcq_prompt(q.question, list(q.options)) for _, q in items]
    letters = letter_token_ids(tokenizer)
    # max_new_tokens = tokens of the gold letter (1 for SmolLM2); group equal lengths.
    new_tokens = [len(tokenizer(q.answer, add_special_tokens=False).input_ids) for _, q in items]
    with dora_norm_cache(model, cache_dora_norms):
        check, solo = check_batching(model, tokenizer, prompts, batch_size, allow_inexact_batching, new_tokens, letters)
        outputs = [solo.texts.get(i, "") for i in range(len(items))]
        letter_logits = torch.empty(len(items), len(letters))
        for i, row in solo.letter_logits.items():
            letter_logits[i] = row
        _generate_rest(model, tokenizer, prompts, new_tokens, check.batch_size, solo, outputs, letter_logits,
                       letters, show_progress)
    results: dict[str, CategoryResult] = {c: CategoryResult(c, 0, 0) for c in questions}
    for (category, q), out, row in zip(items, outputs, letter_logits):
        record = {  # the official file's fields first (its `prompt` has no chat wrapper), then diagnostics
            "prompt": question_text(q.question, list(q.options)),
            "gold": q.answer,
            "subset": q.subject,
            "output": out,
            "prediction": parse_prediction(out),
            "correct": is_correct(out, q.answer),
            "letter_argmax": LETTERS[int(row.argmax())],  # the letter ceiling's answer (diagnostic)
            # P(A..D) among the four letters at the answer position: the letter prior shows in their mean (diagnostic)
            "letter_probs": [round(float(p), 6) for p in torch.softmax(row.float(), dim=-1)],
        }
        cat = results[category]
        cat.records.append(record)
        cat.correct += record["correct"]
        cat.total += 1
    return EvalResult(results, time.perf_counter() - start, check)
