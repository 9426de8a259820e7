"""`evaluate_mmlu(...)`: the whole evaluation as one Python call (CLI and server use it)."""

from __future__ import annotations

from pathlib import Path

from flowertune_llm.evaluate.data import DEFAULT_DATA, by_category, load_questions
from flowertune_llm.evaluate.protocol import LEADERBOARD_CATEGORIES
from flowertune_llm.evaluate.runner import EvalResult, evaluate_questions, load_model, write_outputs
from flowertune_llm.gguf import resolve_model_path
from flowertune_llm.hub import require_hub_or_cache
from flowertune_llm.models import default_device


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
) -> EvalResult:
    """Score a base model (+ adapter) on MMLU categories; write the leaderboard files if asked."""
    questions = by_category(load_questions(data), list(categories), limit)  # cheap checks first
    if not Path(base_model).expanduser().exists():
        require_hub_or_cache("--base-model-name-path", base_model)
    device = device or default_device()
    model_path = resolve_model_path(base_model)
    model, tokenizer = load_model(model_path, peft_path, quantization, device)
    result = evaluate_questions(model, tokenizer, questions, batch_size, show_progress)
    if output_dir is not None:
        extra = {
            "base_model": base_model,
            "peft_path": peft_path,
            "quantization": quantization,
            "batch_size": batch_size,
            "device": device,
            "data": data,
            "limit": limit,
        }
        write_outputs(result, run_name, Path(output_dir), extra)
    return result
