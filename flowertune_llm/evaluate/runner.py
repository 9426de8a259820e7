"""Load the model (+ adapter) as the official script does, generate in batches, score, write."""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flowertune_llm.evaluate.attention import batch_invariant, use_exact_batching
from flowertune_llm.evaluate.data import Question
from flowertune_llm.evaluate.protocol import (
    LEADERBOARD_CATEGORIES,
    build_prompt,
    is_correct,
    parse_prediction,
)


class EvalModelError(ValueError):
    """The model or adapter cannot be used; the message names the path."""


@dataclass
class CategoryResult:
    """Accuracy and generations of one category."""

    category: str
    correct: int
    total: int
    records: list[dict] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        """correct / questions in the category."""
        return self.correct / self.total if self.total else 0.0


@dataclass
class EvalResult:
    """All categories of one evaluation, with timing."""

    categories: dict[str, CategoryResult]
    wall_time_s: float

    @property
    def average(self) -> float | None:
        """Leaderboard average: mean of STEM, social sciences, humanities (None if one is missing)."""
        if not all(c in self.categories for c in LEADERBOARD_CATEGORIES):
            return None
        return sum(self.categories[c].accuracy for c in LEADERBOARD_CATEGORIES) / 3

    def summary(self) -> dict:
        """Machine-readable figures (no generations)."""
        total = sum(c.total for c in self.categories.values())
        return {
            "categories": {
                name: {"accuracy": c.accuracy, "correct": c.correct, "total": c.total}
                for name, c in self.categories.items()
            },
            "average": self.average,
            "questions": total,
            "wall_time_s": round(self.wall_time_s, 3),
            "questions_per_s": round(total / self.wall_time_s, 3) if self.wall_time_s else None,
        }


def _same_base(adapter_base: str, base: str) -> bool:
    if adapter_base == base:
        return True
    a, b = Path(adapter_base).expanduser(), Path(base).expanduser()
    if a.exists() and b.exists():
        return a.resolve() == b.resolve()
    return a.name.lower() == b.name.lower()  # hub id vs. a local copy of the same model


def check_peft_path(peft_path: str, base: str) -> None:
    """Refuse an adapter folder that is missing or was trained on another base model."""
    config_file = Path(peft_path).expanduser() / "adapter_config.json"
    if not config_file.is_file():
        raise EvalModelError(f"--peft-path {peft_path}: no adapter_config.json there")
    adapter_base = json.loads(config_file.read_text()).get("base_model_name_or_path") or ""
    if adapter_base and not _same_base(adapter_base, base):
        raise EvalModelError(
            f"--peft-path {peft_path} was trained on base model {adapter_base!r}, "
            f"but --base-model-name-path is {base!r}"
        )


def load_model(
    base: str, peft_path: str | None, quantization: int, device: str
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Base model as the official script loads it (4-bit: bnb defaults, float32), + adapter."""
    if peft_path:
        check_peft_path(peft_path, base)
    if quantization == 4:
        quant, dtype = BitsAndBytesConfig(load_in_4bit=True), torch.float32
    elif quantization == 8:
        quant, dtype = BitsAndBytesConfig(load_in_8bit=True), torch.float16
    elif quantization == 0:
        quant, dtype = None, torch.float32
    else:
        raise EvalModelError(f"--quantization {quantization}: use 4, 8 or 0 (none)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(
            base, quantization_config=quant, dtype=dtype, device_map={"": device}
        )
    except OSError as exc:
        raise EvalModelError(f"--base-model-name-path {base}: cannot load ({exc})") from exc
    if peft_path:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, peft_path)
        except RuntimeError as exc:  # size mismatch: adapter for another architecture
            raise EvalModelError(f"--peft-path {peft_path}: does not fit {base}: {exc}") from exc
    model.eval()
    return model, tokenizer


def left_pad(
    encoded: Sequence[Sequence[int]], pad_id: int, device: torch.device | str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists as one left-padded batch: (input_ids, attention_mask), padding on the left."""
    width = max(len(ids) for ids in encoded)
    input_ids = torch.tensor([[pad_id] * (width - len(ids)) + list(ids) for ids in encoded], device=device)
    mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
    return input_ids, mask


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    progress: tqdm | None = None,
) -> list[str]:
    """Greedy continuations of `prompts` in left-padded batches that equal one prompt at a time.

    Prompts are sorted by token length so a batch needs little padding, and the model is switched
    to padding-exact batching (`attention.use_exact_batching`): stock SDPA with padding changed
    logits by up to 0.3 on the bf16-rounding CPU 4-bit kernel and flipped about 1% of predictions.
    """
    if batch_size > 1 and not batch_invariant(model):
        warnings.warn(
            f"--batch-size {batch_size}: 8-bit (LLM.int8) models choose their outlier columns over the "
            "whole batch, so batched answers could differ from one prompt at a time; using 1",
            stacklevel=2,
        )
        batch_size = 1
    use_exact_batching(model)
    encoded = [tokenizer(p).input_ids for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id)
    outputs: list[str] = [""] * len(prompts)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i in idx], pad_id, device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config)
        for i, tokens in zip(idx, out[:, input_ids.shape[1] :]):
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(idx))
    return outputs


def evaluate_questions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    questions: dict[str, list[Question]],
    batch_size: int = 16,
    show_progress: bool = True,
) -> EvalResult:
    """Run the protocol on each category; generations and scores per question."""
    start = time.perf_counter()
    results: dict[str, CategoryResult] = {}
    total = sum(len(q) for q in questions.values())
    with tqdm(total=total, desc="MMLU", unit="q", disable=not show_progress) as bar:
        for category, items in questions.items():
            bar.set_postfix_str(category)
            prompts = [build_prompt(q.question, list(q.options)) for q in items]
            # max_new_tokens = tokens of the gold letter (1 for SmolLM2); group equal lengths.
            lengths = [len(tokenizer(q.answer, add_special_tokens=False).input_ids) for q in items]
            outputs = [""] * len(items)
            for length in sorted(set(lengths)):
                sel = [i for i, n in enumerate(lengths) if n == length]
                got = generate(model, tokenizer, [prompts[i] for i in sel], length, batch_size, bar)
                for i, text in zip(sel, got):
                    outputs[i] = text
            records = [
                {
                    "subject": q.subject,
                    "prompt": prompt,
                    "gold": q.answer,
                    "output": out,
                    "prediction": parse_prediction(out),
                    "correct": is_correct(out, q.answer),
                }
                for q, prompt, out in zip(items, prompts, outputs)
            ]
            results[category] = CategoryResult(
                category, sum(r["correct"] for r in records), len(records), records
            )
    return EvalResult(results, time.perf_counter() - start)


def write_outputs(result: EvalResult, run_name: str, output_dir: Path, extra: dict) -> Path:
    """The leaderboard's acc/generation files per category, plus results.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, cat in result.categories.items():
        (output_dir / f"acc_mmlu_{name}_{run_name}.txt").write_text(f"Accuracy: {cat.accuracy}. ")
        with open(output_dir / f"generation_mmlu_{name}_{run_name}.jsonl", "w") as fh:
            for rec in cat.records:
                fh.write(json.dumps(rec) + "\n")
    summary = {"run_name": run_name, **extra, **result.summary()}
    path = output_dir / "results.json"
    path.write_text(json.dumps(summary, indent=2))
    return path


