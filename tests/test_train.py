"""The local round as a plain function, on a tiny Llama in 4-bit on CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from flowertune_llm.config import parse_config
from flowertune_llm.devices import default_device
from flowertune_llm.models import initial_adapter
from flowertune_llm.train import evaluate_adapter, train_one_round
from tests.helpers import tiny_run_config


def test_one_round_in_4bit_changes_the_adapter_and_reports_float32(tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": 4, "train.seq-length": 1024}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    result = train_one_round(cfg, start, partition_id=0, num_partitions=20, lr=1e-2)
    assert math.isfinite(result.train_loss) and result.train_loss > 0
    assert result.num_examples == 50  # 985 rows / 20 partitions; none too long for 1024 tokens
    short = train_one_round(cfg.__class__(**{**cfg.__dict__, "train": cfg.train.__class__(
        **{**cfg.train.__dict__, "seq_length": 60})}), start, 0, 20, 1e-2)
    assert short.num_examples == 43  # the 7 rows whose prompt alone fills 60 tokens are dropped
    assert set(result.state) == set(start)
    assert all(v.dtype == torch.float32 for v in result.state.values())
    assert any(not torch.equal(result.state[k], start[k]) for k in start)


def test_local_evaluation_returns_a_finite_loss(tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": "none"}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    loss, n = evaluate_adapter(cfg, start, partition_id=1, num_partitions=20)
    assert math.isfinite(loss) and n == 50


def test_local_evaluation_loss_is_the_completion_loss_without_the_letter_balance_term(tiny_llama_dir: Path) -> None:
    """eval_loss is the completion loss its docstring promises: the same with the balance term at 5 as at 0."""
    losses = []
    for weight in (0.0, 5.0):
        cfg = parse_config(tiny_run_config(tiny_llama_dir, **{
            "train.prompt-template": "mcq", "train.mcq-fraction": 1.0, "train.mcq-rotations": True,
            "train.mcq-balance": weight, "train.seq-length": 512}))
        start, _ = initial_adapter(cfg.model, cfg.train.seed)
        losses.append(evaluate_adapter(cfg, start, partition_id=1, num_partitions=20)[0])
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_threads_follow_the_cpus_a_process_was_given(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    from flowertune_llm.devices import process_threads

    available = len(os.sched_getaffinity(0))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # what Ray sets for client-resources-num-cpus=1
    assert process_threads() == 1
    monkeypatch.setenv("OMP_NUM_THREADS", str(available + 7))  # never more than the process can run on
    assert process_threads() == available
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert process_threads() == available


def test_optimized_step_keeps_the_loss_mask_normalisation_and_gradients(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, avx512_bf16_cpu: None
) -> None:
    """One batch through the trainer's loss, plain path (TRL's bf16 adapter, every position scored) vs optimized
    (float32 adapter and only the label positions through the LM head, on CPU).

    Both must equal the textbook loss: mean cross-entropy over the completion tokens only, from the
    model's own forward; a change of the mask or of the normalisation fails here. The 4-bit layers
    are built as on an AVX512-BF16 CPU (`avx512_bf16_cpu`): the reference, taken in eval mode
    without gradients, must not depend on which kernel the CPU has.
    """
    from flowertune_llm.devices import packed_4bit_layers

    if default_device() != "cpu":
        pytest.skip("compares float32 CPU arithmetic; on a GPU the trainer computes under bf16 autocast")
    import trl.trainer.utils as trl_utils

    from flowertune_llm.dataset import load_partition
    from flowertune_llm.train import make_trainer
    from tests.helpers import ALPACA_SUBSET

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": 4, "static.dataset.name": str(ALPACA_SUBSET),
                                                          "train.padding-free": False}))  # padded: its own test
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    torch.manual_seed(0)  # a trained-looking adapter, so the adapter's dtype matters
    start = {k: v + 0.05 * torch.randn_like(v) if "lora_B" in k else v for k, v in start.items()}
    data = load_partition(cfg.dataset_name, 0, 20, cfg.train.seed, cfg.train.prompt_template)
    rows = []  # how many positions TRL's fused LM head scores

    class CountingLogProb:
        @staticmethod
        def apply(hidden: torch.Tensor, *args: object) -> object:
            rows.append(hidden.shape[0])
            return real_logprob.apply(hidden, *args)

    real_logprob = trl_utils._ChunkedLogProbFunction
    monkeypatch.setattr(trl_utils, "_ChunkedLogProbFunction", CountingLogProb)
    results = {}
    for optimized in (False, True):
        trainer = make_trainer(cfg, start, data, 1e-3, str(tmp_path / str(optimized)), optimized=optimized)
        model = trainer.model
        assert {p.dtype for p in model.parameters() if p.requires_grad} >= (
            {torch.float32} if optimized else {torch.bfloat16}
        )
        batch = next(iter(trainer.get_train_dataloader()))
        model.eval()  # no dropout: both losses below see the same network
        loss = trainer.compute_loss(model, batch)
        loss.backward()
        grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.requires_grad])
        with torch.no_grad():  # the textbook loss from the same weights
            labels = batch["labels"]
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
            mask = labels[:, 1:] != -100
            assert 0 < mask.sum() < batch["attention_mask"][:, 1:].sum()  # prompts are masked out
            textbook = torch.nn.functional.cross_entropy(logits[:, :-1][mask], labels[:, 1:][mask])
        assert packed_4bit_layers(model) == []  # the reference ran the protocol's float32 dequantize path
        # the optimized path scores only the label positions; the plain one every position
        assert rows[0] == (mask.sum().item() if optimized else mask.numel()), rows
        rows.clear()
        results[optimized] = (loss.item(), textbook.item(), grads)
        model.zero_grad(set_to_none=True)
    (plain_loss, plain_ref, plain_grads), (fast_loss, fast_ref, fast_grads) = results[False], results[True]
    assert fast_loss == pytest.approx(fast_ref, rel=1e-5)  # float32: the same computation
    assert plain_loss == pytest.approx(plain_ref, rel=1e-2)  # bf16 adapter inside, float32 reference
    assert fast_loss == pytest.approx(plain_loss, rel=1e-2)
    cosine = torch.nn.functional.cosine_similarity(fast_grads, plain_grads, dim=0).item()
    assert cosine > 0.99, cosine


@pytest.mark.parametrize("overrides, applied", [({}, False), ({"train.release-memory": True}, True)])
def test_release_memory_is_off_by_default_and_applied_when_turned_on(
    tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch, overrides: dict, applied: bool
) -> None:
    import flowertune_llm.devices as devices_mod

    calls = []
    monkeypatch.setattr(devices_mod, "release_memory_to_os", lambda: calls.append(1) or True)
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **overrides))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    train_one_round(cfg, start, 0, 20, 1e-2)
    assert calls == [1] * (applied and default_device() == "cpu")  # a CPU setting: never called on a GPU


def test_release_memory_to_os_is_accepted_by_glibc() -> None:
    import subprocess
    import sys

    # the real call (its own process: it changes the allocator for good); True where libc is glibc
    code = "import platform; from flowertune_llm.devices import release_memory_to_os as r; print(r(), platform.libc_ver()[0])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == str(out[1] == "glibc"), out


def test_adapter_state_round_trips_and_refuses_a_wrong_name_or_shape(tiny_llama_dir: Path) -> None:
    from flowertune_llm.models import adapter_state, build_peft_model, set_adapter_state

    cfg = parse_config(tiny_run_config(tiny_llama_dir))
    model = build_peft_model(cfg.model, "cpu", cfg.train.seed)
    state = {k: torch.randn_like(v) for k, v in adapter_state(model).items()}
    set_adapter_state(model, state)
    back = adapter_state(model)
    assert all(torch.equal(back[k], state[k]) for k in state)
    back[next(iter(back))].add_(1.0)  # a copy: the model is untouched
    assert all(torch.equal(v, state[k]) for k, v in adapter_state(model).items())
    name = next(iter(state))
    with pytest.raises(ValueError, match="unexpected"):
        set_adapter_state(model, {**state, "base_model.extra.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match=f"adapter tensor {name}: shape"):
        set_adapter_state(model, {**state, name: torch.zeros(3)})
