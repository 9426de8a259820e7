"""`train.padding-free` and `train.cpu-compute`: the same rows make the same step, in the dtype the CPU computes fastest."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.models import initial_adapter
from tests.helpers import ALPACA_SUBSET, tiny_run_config


def _step(cfg, start, data, tmp: Path, label: str):  # noqa: ANN001, ANN202
    """One batch through the trainer's loss and backward (eval mode: no dropout): loss, flat gradients, batch."""
    from flowertune_llm.train import make_trainer

    trainer = make_trainer(cfg, start, data, 1e-3, str(tmp / label), models=None)
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    loss = trainer.compute_loss(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.detach().float().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    return float(loss.detach()), grads, batch, trainer


def _partition(cfg):  # noqa: ANN001, ANN202
    from flowertune_llm.dataset import load_partition

    return load_partition(cfg.dataset_name, 0, 20, cfg.train.seed, cfg.train.prompt_template)


def _padded_and_padding_free(model_dir: Path, tmp_path: Path, quantization: object, batch: int):  # noqa: ANN202
    """One batch of `batch` rows through the trainer, padded and padding-free (float32, eval mode)."""
    base = {"model.quantization": quantization, "static.dataset.name": str(ALPACA_SUBSET), "train.seq-length": 256,
            "train.training-arguments.per-device-train-batch-size": batch}
    results = {}
    for free in (False, True):
        cfg = parse_config(tiny_run_config(model_dir, **base, **{"train.padding-free": free}))
        start, _ = initial_adapter(cfg.model, cfg.train.seed)
        torch.manual_seed(0)  # a trained-looking adapter: lora_B != 0, so every gradient is non-trivial
        start = {k: v + 0.05 * torch.randn_like(v) if "lora_B" in k else v for k, v in start.items()}
        results[free] = _step(cfg, start, _partition(cfg), tmp_path, str(free))
    return results


def _assert_same_step(results, rows: int, rel: float, grad_rel: float) -> None:  # noqa: ANN001
    (padded, g_padded, b_padded, _), (free_loss, g_free, b_free, trainer) = results[False], results[True]
    # the layouts really differ: padding in one, one row of real tokens with restarting positions in the other
    lengths = b_padded["attention_mask"].sum(dim=1)
    assert int(lengths.min()) < b_padded["input_ids"].shape[1]
    assert b_free["input_ids"].shape == (1, int(lengths.sum())) and "attention_mask" not in b_free
    assert int((b_free["position_ids"][0] == 0).sum()) == rows
    assert trainer.model.get_base_model().config._attn_implementation == "flowertune_segment_sdpa"
    assert free_loss == pytest.approx(padded, rel=rel)
    assert set(g_free) == set(g_padded)
    for name, grad in g_padded.items():
        scale = float(grad.abs().max())
        assert scale > 0, name
        assert float((g_free[name] - grad).abs().max()) <= grad_rel * scale, name


@pytest.mark.parametrize("quantization", [4, "none"])
def test_a_padding_free_step_equals_the_padded_step(tiny_llama_dir: Path, tmp_path: Path, quantization: object) -> None:
    """The same 8 rows, padded to the longest vs end to end with attention per row: the loss within 1e-5
    (relative) and every adapter gradient within 1e-4 of its tensor's largest entry (float32)."""
    _assert_same_step(_padded_and_padding_free(tiny_llama_dir, tmp_path, quantization, 8), 8, 1e-5, 1e-4)


def test_a_padding_free_step_of_the_real_weights_equals_the_padded_step(smollm2_model_dir: Path, tmp_path: Path) -> None:
    """SmolLM2-135M in 4-bit (30 layers of float32 rounding): the same tolerances, 4 rows."""
    _assert_same_step(_padded_and_padding_free(smollm2_model_dir, tmp_path, 4, 4), 4, 1e-5, 1e-4)


def test_segment_attention_is_causal_sdpa_on_each_row_alone() -> None:
    """Second path for the attention: each segment of the packed row equals SDPA run on that row by itself."""
    from types import SimpleNamespace

    from flowertune_llm.padding_free import segment_sdpa_forward

    torch.manual_seed(0)
    lengths = [5, 1, 9, 3]
    q, k, v = (torch.randn(1, 4, sum(lengths), 8) for _ in range(3))
    cu = torch.tensor([0, 5, 6, 15, 18], dtype=torch.int32)
    module = SimpleNamespace(is_causal=True, num_key_value_groups=1, training=False)
    out, _ = segment_sdpa_forward(module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=cu, scaling=8 ** -0.5)
    assert out.shape == (1, sum(lengths), 4, 8)
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        alone = torch.nn.functional.scaled_dot_product_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e],
                                                                 is_causal=e - s > 1, scale=8 ** -0.5)
        torch.testing.assert_close(out[0, s:e], alone[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="padding mask"):
        segment_sdpa_forward(module, q, k, v, torch.ones(1, sum(lengths), dtype=torch.bool), cu_seq_lens_q=cu)


def test_bf16_compute_trains_a_bf16_model_with_float32_adapters_and_a_close_loss(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """train.cpu-compute=bfloat16: the base model (embeddings, norms, 4-bit dequantize) in bf16, no autocast, the
    adapter and its gradients float32; its loss within 2% of the float32 step's (bf16 rounding, measured ~0.1%)."""
    losses = {}
    for mode in ("float32", "bfloat16"):
        cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": 4, "train.cpu-compute": mode,
                                                               "static.dataset.name": str(ALPACA_SUBSET)}))
        start, _ = initial_adapter(cfg.model, cfg.train.seed)
        losses[mode], grads, _, trainer = _step(cfg, start, _partition(cfg), tmp_path, mode)
        model = trainer.model
        frozen = {p.dtype for p in model.parameters() if not p.requires_grad and p.is_floating_point()}
        assert frozen == {torch.bfloat16 if mode == "bfloat16" else torch.float32}, frozen
        assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}
        assert {g.dtype for g in grads.values()} == {torch.float32}
        assert not trainer.args.bf16  # no autocast over the model: it is bf16 itself
        assert trainer.compute.bf16 == (mode == "bfloat16")
        assert trainer.compute.metrics()["compute_source"] == 1.0  # forced
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=2e-2)


def test_auto_compute_follows_the_measured_matmul_speed_not_the_flag_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from flowertune_llm import devices

    fast = devices.training_compute("cpu", "auto", 576, 1536, speedup=lambda h, i, t: 6.1)
    slow = devices.training_compute("cpu", "auto", 576, 1536, speedup=lambda h, i, t: 1.2)
    assert fast.dtype == torch.bfloat16 and fast.bf16_speedup == 6.1
    assert slow.dtype == torch.float32 and slow.bf16_speedup == 1.2
    assert devices.training_compute("cpu", "float32", 576, 1536, speedup=lambda *a: 9.0).dtype == torch.float32
    assert devices.training_compute("cpu", "bfloat16", 576, 1536, speedup=lambda *a: 0.5).dtype == torch.bfloat16
    assert devices.describe_compute(True, devices.SOURCE_MEASURED, 6.1).startswith("compute bf16 (matmul bf16 6.1x")
    assert devices.describe_compute(False, devices.SOURCE_FORCED, 0.0) == "compute float32 (train.cpu-compute)"
    # the real probe: a positive ratio, once per process and shape, well under a second
    import time

    devices.bf16_matmul_speedup.cache_clear()
    start = time.perf_counter()
    ratio = devices.bf16_matmul_speedup(576, 1536, torch.get_num_threads())
    assert ratio > 0 and time.perf_counter() - start < 2.0
    assert devices.bf16_matmul_speedup(576, 1536, torch.get_num_threads()) == ratio  # cached


def test_a_round_reports_its_compute_and_layout(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from flowertune_llm import devices
    from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round

    monkeypatch.setattr(devices, "bf16_matmul_speedup", lambda h, i, t: 3.0)  # a machine whose bf16 pays
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"train.cpu-compute": "auto"}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    result = train_one_round(cfg, start, 0, 20, 1e-3, models=ModelCache(), tokenized=TokenizedCache())
    assert result.device["compute_bf16"] == 1.0 and result.device["bf16_matmul_speedup"] == 3.0
    assert result.device["compute_source"] == 0.0 and result.device["padding_free"] == 1.0
    assert all(v.dtype == torch.float32 for v in result.state.values())


@pytest.mark.parametrize(("overrides", "message"), [
    ({"train.training-arguments.padding-free": True}, "train.training-arguments.padding-free: set by the app"),
    ({"train.training-arguments.packing": True},
     "train.training-arguments.packing=True with train.padding-free=true"),
    ({"train.training-arguments.pad-to-multiple-of": 8},
     "train.training-arguments.pad-to-multiple-of=8 with train.padding-free=true"),
    ({"train.cpu-compute": "fp16"}, "train.cpu-compute='fp16': expected one of auto, float32, bfloat16"),
])
def test_refused_settings_name_their_keys(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(tiny_run_config("/nonexistent", **overrides))
    if "padding-free=true" in message:  # the same setting without padding-free is the user's to choose
        parse_config(tiny_run_config("/nonexistent", **overrides, **{"train.padding-free": False}))


def test_the_round_log_says_what_each_client_computed_in_and_why() -> None:
    from flowertune_llm.metrics import round_compute

    clients = [{"compute_bf16": 1.0, "compute_source": 0.0, "bf16_matmul_speedup": 3.7, "padding_free": 1.0},
               {"compute_bf16": 1.0, "compute_source": 0.0, "bf16_matmul_speedup": 3.7, "padding_free": 1.0}]
    assert round_compute(clients) == "compute bf16 (matmul bf16 3.7x float32, threshold 1.5x)"
    clients.append({"compute_bf16": 0.0, "compute_source": 1.0, "bf16_matmul_speedup": 0.0, "padding_free": 0.0})
    assert round_compute(clients) == ("compute bf16 (matmul bf16 3.7x float32, threshold 1.5x); "
                                      "compute float32 (train.cpu-compute), padded")
    assert round_compute([{"loss": 1.0}]) == "compute n/a"  # replies from before these fields


def test_evaluation_keeps_the_protocols_float32_after_a_bf16_training_round_in_the_same_process(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    """A client process that trained in bf16 (bf16 model cached, TRL's tiles set) and then scores as the ServerApp
    does (`Validator`'s AdapterScorer): a float32 4-bit model, and the identity DoRA adapter answers exactly as the
    base model (flowertune-eval, no adapter) on the same questions."""
    from flowertune_llm.evaluate.api import AdapterScorer, evaluate_mmlu
    from flowertune_llm.evaluate.data import by_category, load_questions
    from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round
    from tests.helpers import MMLU_VAL

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"train.cpu-compute": "bfloat16", "model.quantization": 4}))
    start, peft_config = initial_adapter(cfg.model, cfg.train.seed)
    models = ModelCache()
    result = train_one_round(cfg, start, 0, 20, 1e-3, models=models, tokenized=TokenizedCache())
    assert result.device["compute_bf16"] == 1.0
    assert models.get(cfg.model, "cpu", cfg.train.seed, torch.bfloat16).get_base_model().dtype == torch.bfloat16
    questions = by_category(load_questions(str(MMLU_VAL)), ["stem", "social_sciences", "humanities"], 4)
    scorer = AdapterScorer(str(tiny_llama_dir), peft_config, quantization=4, device="cpu")
    identity = scorer.score(start, questions, batch_size=4)
    assert {p.dtype for p in scorer._model.parameters() if p.is_floating_point()} == {torch.float32}
    base = evaluate_mmlu(str(tiny_llama_dir), None, data=str(MMLU_VAL), limit=4, batch_size=4, device="cpu",
                         show_progress=False)
    answers = {name: [(r["output"], r["letter_argmax"]) for r in c.records] for name, c in identity.categories.items()}
    assert answers == {name: [(r["output"], r["letter_argmax"]) for r in c.records]
                       for name, c in base.categories.items()}
