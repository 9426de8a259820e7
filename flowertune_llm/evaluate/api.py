"""`evaluate_mmlu(...)`: the whole evaluation as one Python call; `AdapterScorer`: the same per round."""

from __future__ import annotations

import copy
from pathlib import Path

from peft import LoraConfig, PeftModel, get_peft_model

from flowertune_llm.devices import default_device, hardware
from flowertune_llm.evaluate.data import (
    DEFAULT_DATA,
    Question,
    by_category,
    load_questions,
    question_set_sha256,
    split_of,
)
from flowertune_llm.evaluate.protocol import LEADERBOARD_CATEGORIES
from flowertune_llm.evaluate.model import adapter_config_sha256, adapter_sha256, load_model
from flowertune_llm.evaluate.results import EvalResult, write_outputs
from flowertune_llm.evaluate.runner import evaluate_questions
from flowertune_llm.gguf import model_content_key, resolve_model_path
from flowertune_llm.hub import require_hub_or_cache
from flowertune_llm.models import AdapterState, set_adapter_state


def evaluate_mmlu(
    base_model: str,
    peft_path: str | None = None,
    categories: list[str] | tuple[str, ...] = LEADERBOARD_CATEGORIES,
    data: str = DEFAULT_DATA,
    quantization: int = 4,
    batch_size: int = 16,
    device: str | None = None,
    limit: int | None = None,
    output_dir: Path | None = None,
    run_name: str = "fl",
    show_progress: bool = True,
    allow_inexact_batching: bool = False,
) -> EvalResult:
    """Score a base model (+ adapter) on MMLU categories; write the leaderboard files if asked."""
    questions = by_category(load_questions(data), list(categories), limit)  # cheap checks first
    if not Path(base_model).expanduser().exists():
        require_hub_or_cache("--base-model-name-path", base_model)
    device = device or default_device()
    model_path = resolve_model_path(base_model)
    model, tokenizer = load_model(model_path, peft_path, quantization, device)
    result = evaluate_questions(model, tokenizer, questions, batch_size, show_progress, allow_inexact_batching)
    if output_dir is not None:
        extra = {
            "base_model": base_model,
            "peft_path": peft_path,
            "quantization": quantization,
            "batch_size": batch_size,
            "device": device,
            "data": data,
            "limit": limit,
            "split": split_of(data),
            # the questions scored, by content: rules.evaluation_violations requires the official test split's
            "questions_sha256": question_set_sha256(q for qs in questions.values() for q in qs),
            # identity by content: `flowertune-llm submission` reuses this evaluation only for the same adapter
            # weights and config on the same base weights (rules.evaluation_violations checks the rest)
            "adapter_sha256": adapter_sha256(peft_path) if peft_path else None,
            "adapter_config_sha256": adapter_config_sha256(peft_path) if peft_path else None,
            "base_model_sha256": model_content_key(base_model),
            "hardware": hardware(device),
        }
        write_outputs(result, run_name, Path(output_dir), extra)
    return result


class AdapterScorer:
    """The protocol's base model, loaded once per process; each `score` swaps in an adapter state.

    This is what `flowertune-eval --peft-path` computes for a saved checkpoint (same loading, same
    batched generation and parsing), without reloading the base model every round.
    """

    def __init__(self, base_model: str, peft_config: LoraConfig, quantization: int = 4, device: str | None = None) -> None:
        self.base_model = base_model
        self.peft_config = peft_config
        self.quantization = quantization
        self.device = device or default_device()
        self._model: PeftModel | None = None
        self._tokenizer = None

    def _load(self) -> PeftModel:
        model, self._tokenizer = load_model(resolve_model_path(self.base_model), None, self.quantization, self.device)
        config = copy.deepcopy(self.peft_config)
        config.inference_mode = True  # as PeftModel.from_pretrained loads a checkpoint
        return get_peft_model(model, config).eval()

    def score(
        self,
        state: AdapterState,
        questions: dict[str, list[Question]],
        batch_size: int = 16,
        allow_inexact_batching: bool = False,
    ) -> EvalResult:
        """Protocol accuracy and diagnostics of the base model with adapter `state`."""
        if self._model is None:
            self._model = self._load()
        set_adapter_state(self._model, state)
        return evaluate_questions(
            self._model, self._tokenizer, questions, batch_size, False, allow_inexact_batching
        )
