"""The evaluation with a model: loading and adapter checks, batching against one at a time, outputs, the official stack."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model

from flowertune_llm.evaluate.attention import RowwiseHead, batch_invariant
from flowertune_llm.evaluate.batching import probe_prompts
from flowertune_llm.evaluate.cli import main as eval_main
from flowertune_llm.evaluate.data import by_category, load_questions
from flowertune_llm.evaluate.generation import generate, left_pad
from flowertune_llm.evaluate.model import EvalModelError, check_peft_path, load_model
from flowertune_llm.evaluate.protocol import (
    LEADERBOARD_CATEGORIES,
    mcq_prompt,
    parse_prediction,
)
from flowertune_llm.evaluate.runner import evaluate_questions
from tests.helpers import MMLU_DIR

MMLU_TEST = MMLU_DIR / "mmlu_test.jsonl"


def test_adapter_for_another_base_model_is_refused(tmp_path: Path) -> None:
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "org/other-model"}))
    with pytest.raises(EvalModelError, match="trained on base model 'org/other-model'"):
        check_peft_path(str(tmp_path), "HuggingFaceTB/SmolLM2-135M-Instruct")
    with pytest.raises(EvalModelError, match="no adapter_config.json"):
        check_peft_path(str(tmp_path / "nope"), "x")
    check_peft_path(str(tmp_path), "/models/other-model")  # a local copy of the same model is fine
    local = tmp_path / "local-base"
    local.mkdir()
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(local)}))
    with pytest.raises(EvalModelError, match=f"use --base-model-name-path {local}$"):
        check_peft_path(str(tmp_path), "HuggingFaceTB/SmolLM2-135M-Instruct")


def test_an_adapter_from_one_gguf_import_evaluates_with_another_copy(
    tmp_path: Path, smollm2_gguf: Path, smollm2_model_dir: Path
) -> None:
    from flowertune_llm.checkpoint import save_adapter
    from flowertune_llm.config import parse_config
    from flowertune_llm.models import initial_adapter
    from tests.helpers import tiny_run_config

    # trained on the imported folder (what a run records as base_model_name_or_path) ...
    settings = parse_config(tiny_run_config(smollm2_model_dir, **{"model.quantization": "none"})).model
    state, peft_config = initial_adapter(settings, 0)
    save_adapter(tmp_path / "peft_1", state, peft_config, {})
    base = json.loads((tmp_path / "peft_1" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert base == str(smollm2_model_dir)
    # ... and scored with another copy of the same .gguf file
    copy = tmp_path / "downloads" / "copy.gguf"
    copy.parent.mkdir()
    shutil.copy(smollm2_gguf, copy)
    code = eval_main([
        "--base-model-name-path", str(copy), "--peft-path", str(tmp_path / "peft_1"), "--data", str(MMLU_TEST),
        "--category", "stem", "--limit", "2", "--batch-size", "1", "--output-dir", str(tmp_path / "out"),
        "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    assert json.loads((tmp_path / "out" / "results.json").read_text())["questions"] == 2


def _last_logits(model, tok, encoded: list[list[int]]) -> torch.Tensor:
    ids, mask = left_pad(encoded, tok.pad_token_id)
    with torch.inference_mode():
        out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), logits_to_keep=1)
    return out.logits[:, -1]


def _answers(result) -> list[tuple[str, str]]:
    return [(r["output"], r["letter_argmax"]) for c in result.categories.values() for r in c.records]


def _probe_is_truthful(model, tok, questions, check) -> None:
    """Recompute the probe's comparison with plain forward passes: it must agree with the verdict."""
    prompts = [mcq_prompt(q.question, list(q.options)) for qs in questions.values() for q in qs]
    encoded = [tok(p).input_ids for p in prompts]
    picked = sorted((encoded[i] for i in probe_prompts([len(e) for e in encoded], 12)), key=len)
    batched = torch.cat([_last_logits(model, tok, picked[i : i + 8]) for i in range(0, len(picked), 8)])
    alone = torch.cat([_last_logits(model, tok, [e]) for e in picked])
    assert check.probe_prompts == len(picked) == 12
    assert (check.mode == "exact") == torch.equal(batched, alone) == (check.differing == 0)


@pytest.mark.parametrize("quantization", [4, 0], ids=["4bit+dora", "full-precision"])
def test_batched_answers_equal_one_at_a_time_answers_on_this_device(
    quantization: int, smollm2_model_dir: Path
) -> None:
    """The product's guarantee, whatever this CPU's kernels do: the answers a user gets are the solo ones."""
    questions = by_category(load_questions(str(MMLU_TEST)), ["stem", "humanities"], limit=12)
    model, tok = load_model(str(smollm2_model_dir), None, quantization, "cpu")
    if quantization == 4:  # as when scoring a checkpoint: a non-zero DoRA adapter on top
        torch.manual_seed(0)
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, use_dora=True, init_lora_weights=False)).eval()
    batched = evaluate_questions(model, tok, questions, batch_size=8, show_progress=False)
    alone = evaluate_questions(model, tok, questions, batch_size=1, show_progress=False)
    assert batched.batching.mode in ("exact", "one-at-a-time") and alone.batching.mode == "one-at-a-time"
    assert _answers(batched) == _answers(alone)
    assert len(set(_answers(alone))) > 1  # a real model, not a constant
    _probe_is_truthful(model, tok, questions, batched.batching)


def test_int8_scores_one_prompt_at_a_time(smollm2_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    questions = by_category(load_questions(str(MMLU_TEST)), ["social_sciences"], limit=6)
    model, tok = load_model(str(smollm2_model_dir), None, 8, "cpu")
    assert not batch_invariant(model)
    result = evaluate_questions(model, tok, questions, batch_size=4, show_progress=False)
    assert "--batch-size 4: 8-bit (LLM.int8)" in caplog.text
    assert (result.batching.mode, result.batching.batch_size, result.batching.probe_prompts) == ("one-at-a-time", 1, 0)


def test_a_probe_that_disagrees_falls_back_to_one_at_a_time(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A layer whose rows depend on the batch (as some BLAS kernels do): the check must catch it."""
    args = ["--base-model-name-path", str(tiny_llama_dir), "--data", str(MMLU_TEST), "--limit", "4",
            "--no-progress", "--device", "cpu"]
    assert eval_main([*args, "--batch-size", "1", "--output-dir", str(tmp_path / "solo")]) == 0
    solo = json.loads((tmp_path / "solo" / "results.json").read_text())
    assert solo["batching"] == "one-at-a-time"

    def batch_dependent(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x) + 1e-3 * (x.shape[0] - 1)  # solo rows unchanged, batched rows shifted

    monkeypatch.setattr(RowwiseHead, "forward", batch_dependent)
    capsys.readouterr()
    assert eval_main([*args, "--batch-size", "4", "--output-dir", str(tmp_path / "fallback")]) == 0
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "batching check" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: batching check: 6 of 6 probe prompts")
    assert "scoring one prompt at a time" in lines[0]
    fallback = json.loads((tmp_path / "fallback" / "results.json").read_text())
    assert fallback["batching"] == "one-at-a-time"
    check = fallback["batching_check"]
    assert (check["probe_prompts"], check["differing"], check["batch_size"]) == (6, 6, 1)
    assert check["max_abs_diff"] == pytest.approx(3e-3, rel=1e-2)  # a batch of 4 rows: shifted by 3e-3
    for cat in ("stem", "social_sciences", "humanities"):  # the answers are the solo ones
        name = f"generation_mmlu_{cat}_fl.jsonl"
        assert (tmp_path / "fallback" / name).read_text() == (tmp_path / "solo" / name).read_text()

    assert eval_main([*args, "--batch-size", "4", "--allow-inexact-batching", "--output-dir", str(tmp_path / "k")]) == 0
    kept = json.loads((tmp_path / "k" / "results.json").read_text())
    assert (kept["batching"], kept["batching_check"]["batch_size"]) == ("inexact", 4)
    assert "keeping batches of 4" in capsys.readouterr().err


def test_cli_writes_leaderboard_files_and_scores_an_adapter(
    tmp_path: Path, tiny_llama_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowertune_llm.checkpoint import save_adapter
    from flowertune_llm.config import parse_config
    from flowertune_llm.models import initial_adapter
    from tests.helpers import tiny_run_config

    state, peft_config = initial_adapter(parse_config(tiny_run_config(tiny_llama_dir)).model, 0)
    save_adapter(tmp_path / "peft_1", state, peft_config, {})
    out = tmp_path / "out"
    code = eval_main([
        "--base-model-name-path", str(tiny_llama_dir), "--peft-path", str(tmp_path / "peft_1"),
        "--data", str(MMLU_TEST), "--limit", "3", "--batch-size", "2", "--run-name", "t",
        "--output-dir", str(out), "--no-progress", "--device", "cpu",
    ])
    assert code == 0
    for cat in ("stem", "social_sciences", "humanities"):
        assert (out / f"acc_mmlu_{cat}_t.txt").read_text().startswith("Accuracy: ")
        # as the official save_results writes it: one JSON array of {prompt (no chat wrapper), gold, subset, output}
        records = json.loads((out / f"generation_mmlu_{cat}_t.jsonl").read_text())
        assert isinstance(records, list) and len(records) == 3
        assert list(records[0])[:4] == ["prompt", "gold", "subset", "output"] and "correct" in records[0]
        assert records[0]["prompt"].startswith("Answer the following multiple choice question.\nQuestion: ")
        assert records[0]["prompt"].endswith("\nThe answer is:\n") and "<|im_start|>" not in records[0]["prompt"]
    summary = json.loads((out / "results.json").read_text())
    assert summary["questions"] == 9 and summary["average"] is not None
    assert summary["batching"] in ("exact", "one-at-a-time")
    diag = summary["diagnostics"]
    assert "not leaderboard figures" in diag["note"]
    assert set(diag["categories"]["stem"]) >= {"valid_letter_rate", "letter_ceiling", "predicted_letters", "gold_letters"}
    printed = capsys.readouterr().out
    assert "diagnostics, not leaderboard figures" in printed and "results.json" in printed


def test_letter_ceiling_and_valid_letters_equal_a_direct_computation(tmp_path: Path, smollm2_model_dir: Path) -> None:
    """flowertune-eval's diagnostics = one plain forward pass per question, argmax over the letter tokens."""
    out = tmp_path / "out"
    assert eval_main(["--base-model-name-path", str(smollm2_model_dir), "--data", str(MMLU_TEST), "--limit", "12",
                      "--batch-size", "8", "--output-dir", str(out), "--no-progress", "--device", "cpu"]) == 0
    summary = json.loads((out / "results.json").read_text())
    model, tok = load_model(str(smollm2_model_dir), None, 4, "cpu")
    letter_ids = [tok(letter, add_special_tokens=False).input_ids[0] for letter in "ABCD"]
    means = {"letter_ceiling": [], "valid_letter_rate": []}
    shares, probs = [], []
    for cat, qs in by_category(load_questions(str(MMLU_TEST)), list(LEADERBOARD_CATEGORIES), 12).items():
        ceiling = valid = 0
        predicted, prob = Counter(), torch.zeros(4)
        for q in qs:
            logits = _last_logits(model, tok, [tok(mcq_prompt(q.question, list(q.options))).input_ids])[0]
            ceiling += "ABCD"[int(logits[letter_ids].argmax())] == q.answer
            answer = parse_prediction(tok.decode([int(logits.argmax())], skip_special_tokens=True))
            valid += answer in ("a", "b", "c", "d")
            predicted[answer if answer in ("a", "b", "c", "d") else "other"] += 1
            prob += torch.softmax(logits[letter_ids].float(), dim=-1)
        diag = summary["diagnostics"]["categories"][cat]
        assert diag["letter_ceiling"] == ceiling / len(qs)
        assert diag["valid_letter_rate"] == valid / len(qs)
        # the letter prior: the largest share of one letter among all answers, and the mean P(A..D) among the letters
        assert diag["largest_letter_share"] == max(predicted[k] for k in "abcd") / len(qs)
        assert list(diag["letter_probability"].values()) == pytest.approx((prob / len(qs)).tolist(), abs=1e-4)
        means["letter_ceiling"].append(ceiling / len(qs))
        means["valid_letter_rate"].append(valid / len(qs))
        shares.append({k: predicted[k] / len(qs) for k in "abcd"})
        probs.append(prob / len(qs))
    for key, values in means.items():
        assert summary["diagnostics"]["average"][key] == pytest.approx(sum(values) / 3)
    average = summary["diagnostics"]["average"]
    assert average["largest_letter_share"] == pytest.approx(max(sum(s[k] for s in shares) / 3 for k in "abcd"))
    assert list(average["letter_probability"].values()) == pytest.approx((sum(probs) / 3).tolist(), abs=1e-4)
    assert 0 < summary["diagnostics"]["average"]["valid_letter_rate"] < 1  # the untuned model: some letters, not all


def test_cli_bad_category_fails_before_loading_a_model(tmp_path: Path, capsys) -> None:
    code = eval_main(["--category", "stem,nope", "--data", str(MMLU_TEST), "--output-dir", str(tmp_path / "o"),
                      "--base-model-name-path", "/no/such/model"])
    assert code == 2
    assert "--category nope: unknown" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_dora_norm_cache_gives_bit_identical_logits_and_follows_adapter_swaps(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The norm is computed once per layer per adapter; logits equal the uncached ones bit for bit."""
    from peft import set_peft_model_state_dict
    from peft.tuners.lora.dora import DoraLinearLayer

    from flowertune_llm.evaluate.generation import letter_token_ids
    from flowertune_llm.evaluate.model import dora_norm_cache
    from flowertune_llm.models import adapter_state

    qs = by_category(load_questions(str(MMLU_TEST)), ["stem"], limit=3)["stem"]
    prompts = [mcq_prompt(q.question, list(q.options)) for q in qs]
    model, tok = load_model(str(tiny_llama_dir), None, 4, "cpu")
    config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.075, use_dora=True, task_type="CAUSAL_LM")
    model = get_peft_model(model, config).eval()
    layers = sum(isinstance(m, DoraLinearLayer) for m in model.modules())
    letters = letter_token_ids(tok)
    norms = {"n": 0}
    real_norm = torch.linalg.norm

    def counting_norm(*a, **kw):  # noqa: ANN002, ANN003, ANN202
        norms["n"] += 1
        return real_norm(*a, **kw)

    monkeypatch.setattr(torch.linalg, "norm", counting_norm)
    logits = []
    for seed in (1, 2):  # two different trained-looking adapters, swapped in like AdapterScorer does
        torch.manual_seed(seed)
        set_peft_model_state_dict(model, {k: v + 0.05 * torch.randn_like(v) for k, v in adapter_state(model).items()})
        norms["n"] = 0
        plain = generate(model, tok, prompts, 1, 1, None, letters)
        assert norms["n"] == layers * len(prompts)  # PEFT alone: every forward pass
        norms["n"] = 0
        with dora_norm_cache(model):
            cached = generate(model, tok, prompts, 1, 1, None, letters)
        assert norms["n"] == layers  # once per layer for this adapter
        assert cached[0] == plain[0] and torch.equal(cached[1], plain[1])
        logits.append(cached[1])
    assert not torch.equal(logits[0], logits[1])  # the swap really changed the model (and the cache followed)


@pytest.mark.parametrize("dora", [True, False])
def test_the_official_evaluators_stack_loads_a_checkpoint_and_computes_our_logits(
    tmp_path: Path, tiny_llama_dir: Path, official_stack: Path, dora: bool
) -> None:
    """peft 0.14.0 + transformers 4.53 (4-bit fp4, float32, as the official eval.py) on a saved LoRA/DoRA checkpoint:
    the same answer-position logits as flowertune-eval (checkpoints of a real `flwr run`: the e2e sweep test)."""
    from flowertune_llm.checkpoint import save_adapter
    from flowertune_llm.config import parse_config
    from flowertune_llm.models import initial_adapter
    from tests.helpers import tiny_run_config
    from tests.official_evaluator import official_logits, our_logits

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.lora.use-dora": dora}))
    state, peft_config = initial_adapter(cfg.model, 0)
    torch.manual_seed(0)  # a trained-looking adapter
    state = {k: v + 0.05 * torch.randn_like(v) for k, v in state.items()}
    folder = save_adapter(tmp_path / "peft_1", state, peft_config, {})
    prompts = [mcq_prompt("What is 2 + 2?", ["3", "4", "5", "6"]),
               mcq_prompt("Which planet is largest?", ["Mars", "Venus", "Jupiter", "Earth"])]
    theirs = official_logits(official_stack, str(tiny_llama_dir), str(folder), prompts, tmp_path / "official.pt")
    assert theirs["versions"] == ["4.53.0", "0.14.0"]
    ours = our_logits(str(tiny_llama_dir), str(folder), prompts)
    assert (theirs["logits"].argmax(-1) == ours.argmax(-1)).all()
    assert (theirs["logits"] - ours).abs().max().item() < 1e-4
