"""Load the model (+ adapter) as the official script does, generate in batches, score, write."""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from peft.tuners.lora.dora import DoraLinearLayer
from tqdm.auto import tqdm
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    GenerationConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from flowertune_llm.devices import require_protocol_arithmetic, use_protocol_arithmetic
import flowertune_llm.ml_stack  # noqa: F401  (progress bars quiet, lazy names resolved)
from flowertune_llm.evaluate.attention import batch_invariant, use_exact_batching
from flowertune_llm.evaluate.data import Question
from flowertune_llm.evaluate.protocol import (
    LEADERBOARD_CATEGORIES,
    ANSWER_LETTERS,
    LETTERS,
    is_correct,
    mcq_prompt,
    parse_prediction,
    question_text,
)
from flowertune_llm.gguf import imported_source, model_identity

#: What results.json and the printout say about the answer diagnostics.
DIAGNOSTICS_NOTE = (
    "diagnostics, not leaderboard figures: valid_letter_rate = share of outputs that parse to a-d; "
    "letter_ceiling = accuracy of the argmax over the A/B/C/D logits at the answer position"
)


LOG = logging.getLogger("flowertune_llm.evaluate")


class EvalModelError(ValueError):
    """The model or adapter cannot be used; the message names the path."""


@dataclass
class CategoryResult:
    """Accuracy, answer diagnostics and generations of one category."""

    category: str
    correct: int
    total: int
    records: list[dict] = field(default_factory=list, repr=False)

    @property
    def accuracy(self) -> float:
        """correct / questions in the category."""
        return self.correct / self.total if self.total else 0.0

    def _share(self, hit) -> float:  # noqa: ANN001
        return sum(1 for r in self.records if hit(r)) / len(self.records) if self.records else 0.0

    @property
    def valid_letter_rate(self) -> float:
        """Share of outputs the protocol's parser turns into a, b, c or d (format, not knowledge)."""
        return self._share(lambda r: r["prediction"] in ANSWER_LETTERS)

    @property
    def letter_ceiling(self) -> float:
        """Accuracy if the model always answered with its most likely option letter."""
        return self._share(lambda r: r["letter_argmax"] == r["gold"])

    def diagnostics(self) -> dict:
        """Valid-letter rate, letter ceiling, predicted vs gold letters, the commonest outputs."""
        preds = Counter(r["prediction"] if r["prediction"] in ANSWER_LETTERS else "other" for r in self.records)
        gold = Counter(r["gold"].lower() for r in self.records)
        n = max(len(self.records), 1)
        return {
            "valid_letter_rate": self.valid_letter_rate,
            "letter_ceiling": self.letter_ceiling,
            "predicted_letters": {k: preds[k] / n for k in (*ANSWER_LETTERS, "other")},
            "gold_letters": {k: gold[k] / n for k in ANSWER_LETTERS},
            "top_outputs": Counter(r["output"] for r in self.records).most_common(3),
        }


@dataclass
class EvalResult:
    """All categories of one evaluation, with timing and how batching was checked."""

    categories: dict[str, CategoryResult]
    wall_time_s: float
    batching: BatchingCheck | None = None

    def _mean(self, attr: str) -> float | None:
        if not all(c in self.categories for c in LEADERBOARD_CATEGORIES):
            return None
        return sum(getattr(self.categories[c], attr) for c in LEADERBOARD_CATEGORIES) / 3

    @property
    def average(self) -> float | None:
        """Leaderboard average: mean of STEM, social sciences, humanities (None if one is missing)."""
        return self._mean("accuracy")

    @property
    def valid_letter_rate(self) -> float | None:
        """Mean valid-letter rate of the three leaderboard categories (diagnostic)."""
        return self._mean("valid_letter_rate")

    @property
    def letter_ceiling(self) -> float | None:
        """Mean letter ceiling of the three leaderboard categories (diagnostic)."""
        return self._mean("letter_ceiling")

    def summary(self) -> dict:
        """Machine-readable figures (no generations)."""
        total = sum(c.total for c in self.categories.values())
        return {
            "categories": {
                name: {"accuracy": c.accuracy, "correct": c.correct, "total": c.total}
                for name, c in self.categories.items()
            },
            "average": self.average,
            "diagnostics": {
                "note": DIAGNOSTICS_NOTE,
                "average": {"valid_letter_rate": self.valid_letter_rate, "letter_ceiling": self.letter_ceiling},
                "categories": {name: c.diagnostics() for name, c in self.categories.items()},
            },
            "batching": self.batching.mode if self.batching else None,
            "batching_check": self.batching.to_dict() if self.batching else None,
            "questions": total,
            "wall_time_s": round(self.wall_time_s, 3),
            "questions_per_s": round(total / self.wall_time_s, 3) if self.wall_time_s else None,
        }

    def report(self) -> str:
        """The human-readable summary: official scores, then the diagnostics, labelled as such."""
        lines = [f"{'category':<16} {'accuracy':>8}   | {'letters':>7} {'ceiling':>7}  predicted a/b/c/d/other (gold a/b/c/d)"]
        rows = [(n, c.accuracy, c.valid_letter_rate, c.letter_ceiling, c.diagnostics()) for n, c in self.categories.items()]
        for name, acc, valid, ceiling, diag in rows:
            pred = "/".join(f"{100 * v:.0f}" for v in diag["predicted_letters"].values())
            gold = "/".join(f"{100 * v:.0f}" for v in diag["gold_letters"].values())
            lines.append(f"{name:<16} {100 * acc:>8.2f}   | {100 * valid:>6.1f}% {100 * ceiling:>7.2f}  {pred} ({gold})")
        if self.average is not None:
            lines.append(
                f"{'average':<16} {100 * self.average:>8.2f}   | {100 * self.valid_letter_rate:>6.1f}% "
                f"{100 * self.letter_ceiling:>7.2f}"
            )
        lines.append(f"accuracy = the leaderboard's figure; right of '|': {DIAGNOSTICS_NOTE}")
        if self.batching is not None:
            b = self.batching
            probe = f", probe: {b.differing} of {b.probe_prompts} prompts differ" if b.probe_prompts else ""
            lines.append(f"batching: {b.mode} (batch size {b.batch_size}{probe})")
        return "\n".join(lines)


def same_base(adapter_base: str, base: str) -> bool:
    if adapter_base == base or model_identity(adapter_base) == model_identity(base):
        return True
    a, b = Path(adapter_base).expanduser(), Path(base).expanduser()
    if a.exists() and b.exists():
        return False  # two local models with different content
    return a.name.lower() == b.name.lower()  # hub id vs. a local copy of the same model


def _working_base(adapter_base: str) -> str | None:
    """A value of --base-model-name-path that would load the adapter's own base model, if one exists here."""
    source = imported_source(adapter_base)
    if source and Path(source.get("gguf", "")).is_file():
        return source["gguf"]
    if Path(adapter_base).expanduser().exists() or not adapter_base.startswith(("/", ".", "~")):
        return adapter_base
    return None


def check_peft_path(peft_path: str, base: str) -> None:
    """Refuse an adapter folder that is missing or was trained on another base model."""
    config_file = Path(peft_path).expanduser() / "adapter_config.json"
    if not config_file.is_file():
        raise EvalModelError(f"--peft-path {peft_path}: no adapter_config.json there")
    adapter_base = json.loads(config_file.read_text()).get("base_model_name_or_path") or ""
    if adapter_base and not same_base(adapter_base, base):
        working = _working_base(adapter_base)
        hint = (
            f"; use --base-model-name-path {working}"
            if working
            else " (not found on this machine; pass that model, or its .gguf file)"
        )
        raise EvalModelError(
            f"--peft-path {peft_path} was trained on base model {adapter_base!r}, "
            f"but --base-model-name-path is {base!r}{hint}"
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
    use_protocol_arithmetic(model)  # the protocol's float32 arithmetic on every CPU (devices.py)
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


def letter_token_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token each option letter starts with, as the model would write it at the answer position."""
    return [tokenizer(letter, add_special_tokens=False).input_ids[0] for letter in LETTERS]


def generate(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int,
    batch_size: int,
    progress: tqdm | None = None,
    columns: Sequence[int] | None = None,
) -> tuple[list[str], torch.Tensor]:
    """Greedy continuations, plus the logits at the answer position (first new token), in prompt order.

    Prompts are sorted by token length and left-padded in batches of `batch_size`, with
    padding-exact attention and a row-wise output layer (`attention.use_exact_batching`), so a
    prompt's answer does not depend on its batch where the device's kernels allow it (see
    `check_batching`). `columns` keeps only those vocabulary entries of the logits (all if None):
    the letter ceiling needs four of them, from this same forward pass.
    """
    use_exact_batching(model)
    encoded = [tokenizer(p).input_ids for p in prompts]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad_id,
        return_dict_in_generate=True, output_logits=True,
    )
    outputs: list[str] = [""] * len(prompts)
    first: torch.Tensor | None = None
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        input_ids, attention_mask = left_pad([encoded[i] for i in idx], pad_id, device)
        with torch.inference_mode():
            out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=gen_config)
        logits = out.logits[0].float()
        if columns is not None:
            logits = logits[:, list(columns)]
        if first is None:
            first = torch.empty(len(prompts), logits.shape[1])
        first[idx] = logits.cpu()
        for i, tokens in zip(idx, out.sequences[:, input_ids.shape[1] :]):
            outputs[i] = tokenizer.decode(tokens, skip_special_tokens=True)
        if progress is not None:
            progress.update(len(idx))
    return outputs, first if first is not None else torch.empty(0, 0)


@dataclass(frozen=True)
class BatchingCheck:
    """What the on-device probe found, and so how the questions were scored."""

    mode: str  # "exact" | "one-at-a-time" | "inexact"
    batch_size: int  # the batch size the scoring used
    requested_batch_size: int
    probe_prompts: int = 0
    differing: int = 0  # probe prompts whose answer-position logits differ batched vs alone
    max_abs_diff: float = 0.0
    flipped: int = 0  # probe prompts whose greedy answer token differs
    reason: str = ""

    def to_dict(self) -> dict:
        """JSON-friendly view for results.json."""
        return asdict(self)


def probe_prompts(encoded_lengths: Sequence[int], count: int) -> list[int]:
    """Indices of `count` prompts spread evenly over the token lengths (so probe batches are padded)."""
    order = sorted(range(len(encoded_lengths)), key=lambda i: encoded_lengths[i])
    if count >= len(order):
        return order
    step = (len(order) - 1) / max(count - 1, 1)
    return [order[round(k * step)] for k in range(count)]


@dataclass
class SoloAnswers:
    """Prompts the probe already scored one at a time: their official answers, reused by the scoring."""

    texts: dict[int, str] = field(default_factory=dict)
    letter_logits: dict[int, torch.Tensor] = field(default_factory=dict)


def check_batching(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    batch_size: int,
    allow_inexact: bool = False,
    new_tokens: Sequence[int] | None = None,
    columns: Sequence[int] = (),
) -> tuple[BatchingCheck, SoloAnswers]:
    """Decide, on this device, whether batches give the one-at-a-time answers; fall back if not.

    Batched and solo answers are equal only where the device's kernels compute a row the same way
    whatever the batch (BLAS, bitsandbytes and cuBLAS choose kernels by shape and CPU), so this
    is measured, not assumed: a batch and a half of the run's own prompts, spread over their
    lengths, is scored batched and one at a time, and the answer-position logits are compared
    bit for bit. Any difference means one prompt at a time (or, with `allow_inexact`, batches
    kept and the result marked "inexact"). The probe's solo answers are official answers, so
    they are returned (texts, and the logits of `columns`) for the scoring to reuse.
    """
    solo = SoloAnswers()
    if batch_size <= 1 or len(prompts) <= 1:
        return BatchingCheck("one-at-a-time", 1, batch_size, reason="batch size 1"), solo
    if not batch_invariant(model):
        reason = "8-bit (LLM.int8) picks its outlier columns over the whole batch"
        if allow_inexact:
            return BatchingCheck("inexact", batch_size, batch_size, reason=reason), solo
        LOG.warning("--batch-size %d: %s; scoring one prompt at a time", batch_size, reason)
        return BatchingCheck("one-at-a-time", 1, batch_size, reason=reason), solo
    new_tokens = list(new_tokens) if new_tokens is not None else [1] * len(prompts)
    length = Counter(new_tokens).most_common(1)[0][0]  # probe prompts share one answer length
    pool = [i for i, n in enumerate(new_tokens) if n == length]
    lengths = [len(tokenizer(prompts[i]).input_ids) for i in pool]
    picked = [pool[k] for k in probe_prompts(lengths, batch_size + max(1, batch_size // 2))]
    _, batched = generate(model, tokenizer, [prompts[i] for i in picked], length, batch_size)
    texts, alone = generate(model, tokenizer, [prompts[i] for i in picked], length, 1)
    for k, i in enumerate(picked):
        solo.texts[i], solo.letter_logits[i] = texts[k], alone[k, list(columns)]
    differing = int((batched != alone).any(dim=1).sum())
    figures = {
        "probe_prompts": len(picked),
        "differing": differing,
        "max_abs_diff": float((batched - alone).abs().max()),
        "flipped": int((batched.argmax(dim=1) != alone.argmax(dim=1)).sum()),
    }
    if differing == 0:
        return BatchingCheck("exact", batch_size, batch_size, **figures), solo
    line = (
        f"batching check: {differing} of {len(picked)} probe prompts give other answer-position logits "
        f"batched than one at a time on this device (largest difference {figures['max_abs_diff']:.3g}, "
        f"{figures['flipped']} predictions flipped); "
    )
    if allow_inexact:
        LOG.warning("%skeeping batches of %d (--allow-inexact-batching)", line, batch_size)
        return BatchingCheck("inexact", batch_size, batch_size, **figures, reason="probe differed"), SoloAnswers()
    LOG.warning("%sscoring one prompt at a time (--allow-inexact-batching keeps the batches)", line)
    return BatchingCheck("one-at-a-time", 1, batch_size, **figures, reason="probe differed"), solo


#: Cache DoRA weight norms during an evaluation (False only to measure the uncached cost).
DORA_NORM_CACHE = True


@contextlib.contextmanager
def dora_norm_cache(model: torch.nn.Module) -> Iterator[None]:
    """Compute each DoRA layer's weight norm once for this model's current adapter, not per forward.

    The norm depends only on the (frozen) base weight and the adapter, not on the input, so PEFT's
    own cache gives the same logits bit for bit; it is emptied on entry and exit because the
    caller may swap the adapter's tensors between evaluations.
    """
    from peft.helpers import DoraCaching

    if not DORA_NORM_CACHE:
        yield
        return
    layers = [m for m in model.modules() if isinstance(m, DoraLinearLayer)]
    for layer in layers:
        layer._cache_clear()
    try:
        with DoraCaching():
            yield
    finally:
        for layer in layers:
            layer._cache_clear()


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
) -> EvalResult:
    """Run the protocol on each category: generations, scores and answer diagnostics per question."""
    require_protocol_arithmetic(model)  # the guard: no 4-bit layer on the fused bf16 CPU kernel
    start = time.perf_counter()
    items = [(category, q) for category, qs in questions.items() for q in qs]
    prompts = [mcq_prompt(q.question, list(q.options)) for _, q in items]
    letters = letter_token_ids(tokenizer)
    # max_new_tokens = tokens of the gold letter (1 for SmolLM2); group equal lengths.
    new_tokens = [len(tokenizer(q.answer, add_special_tokens=False).input_ids) for _, q in items]
    with dora_norm_cache(model):
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
        }
        cat = results[category]
        cat.records.append(record)
        cat.correct += record["correct"]
        cat.total += 1
    return EvalResult(results, time.perf_counter() - start, check)


def write_outputs(result: EvalResult, run_name: str, output_dir: Path, extra: dict) -> Path:
    """The leaderboard's acc/generation files per category, plus results.json."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for name, cat in result.categories.items():
        (output_dir / f"acc_mmlu_{name}_{run_name}.txt").write_text(f"Accuracy: {cat.accuracy}. ")
        # as the official save_results writes it (pandas' to_json, orient="records"): one JSON array
        (output_dir / f"generation_mmlu_{name}_{run_name}.jsonl").write_text(json.dumps(cat.records))
    summary = {"run_name": run_name, **extra, **result.summary()}
    path = output_dir / "results.json"
    path.write_text(json.dumps(summary, indent=2))
    return path


