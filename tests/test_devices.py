"""One arithmetic per device (flowertune_llm/devices.py): 4-bit on CPU, adapter precision, one device per client.

The AVX512-BF16 tests hold on any x86 CPU: bitsandbytes decides per layer, at construction
(`has_avx512bf16()`), whether a 4-bit layer repacks itself for its fused bf16 kernel at its first
eval-mode forward without gradients. Faking that answer makes every layer built in the test
behave as on such a CPU (the repacking is plain tensor code and runs anywhere).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from flowertune_llm.config import parse_config
from flowertune_llm.devices import (
    ArithmeticError4bit,
    adapter_dtype,
    apply_adapter_precision,
    default_device,
    packed_4bit_layers,
    require_protocol_arithmetic,
    use_protocol_arithmetic,
)
from tests.helpers import MMLU_DIR, tiny_run_config


def _eval_forward(model: torch.nn.Module) -> None:
    """What evaluation does: eval mode, no gradients (the condition under which bitsandbytes repacks)."""
    model.eval()
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 5, 9, 14, 3]]))


def _dequantized(layer: torch.nn.Module) -> torch.Tensor:
    from peft.utils.integrations import dequantize_module_weight

    return dequantize_module_weight(layer).detach().clone()


def test_a_raw_bitsandbytes_model_repacks_and_the_guard_refuses_it(tiny_llama_dir: Path, avx512_bf16_cpu: None) -> None:
    """The control: loaded without the app, the bug happens on this (faked) CPU, and the guard sees it."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_llama_dir, quantization_config=BitsAndBytesConfig(load_in_4bit=True), dtype=torch.float32,
        device_map={"": "cpu"},
    )
    layer = model.model.layers[0].self_attn.q_proj
    original = _dequantized(layer)
    with pytest.raises(ArithmeticError4bit, match="armed"):  # armed before it ever ran
        require_protocol_arithmetic(model)
    _eval_forward(model)
    assert packed_4bit_layers(model)  # bitsandbytes' own conversion ran
    assert not torch.equal(_dequantized(layer), original)  # what DoRA's norm would be taken from
    with pytest.raises(ArithmeticError4bit, match="packed"):
        require_protocol_arithmetic(model)
    with pytest.raises(ArithmeticError4bit, match="reload"):  # the repacking rounded the scales: no way back
        use_protocol_arithmetic(model)


def test_no_model_the_app_builds_ever_packs_its_4bit_weights(
    tmp_path: Path, tiny_llama_dir: Path, avx512_bf16_cpu: None
) -> None:
    """Training model, evaluation model, in-training scorer, and a kept model after a local evaluation."""
    import flowertune_llm.train as train_mod
    from flowertune_llm.evaluate.api import AdapterScorer
    from flowertune_llm.evaluate.data import by_category, load_questions
    from flowertune_llm.evaluate.model import load_model
    from flowertune_llm.models import build_peft_model, initial_adapter

    # lora r=4: a model setting no other test uses, so the process's kept model is built here, armed
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": 4, "model.lora.peft-lora-r": 4}))
    training = build_peft_model(cfg.model, "cpu", 0)
    _eval_forward(training)
    assert packed_4bit_layers(training) == []

    evaluation, _ = load_model(str(tiny_llama_dir), None, 4, "cpu")
    _eval_forward(evaluation)
    assert packed_4bit_layers(evaluation) == []

    state, peft_config = initial_adapter(cfg.model, 0)
    scorer = AdapterScorer(str(tiny_llama_dir), peft_config, device="cpu")
    questions = by_category(load_questions(str(MMLU_DIR / "mmlu_val.jsonl")), ["stem"], 2)
    scorer.score(state, questions, batch_size=2)
    assert packed_4bit_layers(scorer._model) == []

    train_mod.evaluate_adapter(cfg, state, 0, 20)  # eval mode + no_grad on the process's kept model
    kept = train_mod.MODELS.get(cfg.model, default_device(), cfg.train.seed)
    assert packed_4bit_layers(kept) == []
    result = train_mod.train_one_round(cfg, state, 0, 20, 1e-2)  # a later round on that same kept model
    assert packed_4bit_layers(kept) == [] and result.train_loss > 0


def test_a_dora_norm_taken_by_the_app_is_the_norm_of_the_dequantized_original_weight(
    tiny_llama_dir: Path, avx512_bf16_cpu: None
) -> None:
    from peft.tuners.lora.dora import DoraLinearLayer
    from peft.tuners.lora.layer import LoraLayer

    from flowertune_llm.models import build_peft_model

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"model.quantization": 4}))
    assert cfg.model.lora.use_dora
    model = build_peft_model(cfg.model, "cpu", 0)
    lora = next(m for m in model.modules() if isinstance(m, LoraLayer) and "default" in m.lora_magnitude_vector)
    dora: DoraLinearLayer = lora.lora_magnitude_vector["default"]
    original = _dequantized(lora.base_layer)
    torch.manual_seed(0)
    with torch.no_grad():  # a trained-looking adapter, so the norm involves B @ A too
        lora.lora_B["default"].weight.normal_(0, 0.05)
    _eval_forward(model)  # where bitsandbytes would have repacked
    scaling = lora.scaling["default"]
    delta = lora.lora_B["default"].weight @ lora.lora_A["default"].weight
    with torch.no_grad():
        taken = dora.get_weight_norm(_dequantized(lora.base_layer), delta, scaling)
    expected = torch.linalg.norm(original + scaling * delta, dim=1)
    assert torch.equal(taken, expected)


def test_the_identity_dora_adapter_answers_exactly_as_the_base_model(
    tmp_path: Path, tiny_llama_dir: Path, avx512_bf16_cpu: None
) -> None:
    """flowertune-eval of the base and of the initial (lora_B = 0) DoRA adapter: the same generations and logits."""
    from flowertune_llm.checkpoint import save_adapter
    from flowertune_llm.evaluate.api import evaluate_mmlu
    from flowertune_llm.models import initial_adapter

    state, peft_config = initial_adapter(parse_config(tiny_run_config(tiny_llama_dir)).model, 0)
    assert peft_config.use_dora
    save_adapter(tmp_path / "peft_0", state, peft_config, {})
    runs = {}
    for name, peft in (("base", None), ("identity", str(tmp_path / "peft_0"))):
        result = evaluate_mmlu(str(tiny_llama_dir), peft, data=str(MMLU_DIR / "mmlu_val.jsonl"), limit=4,
                               batch_size=4, device="cpu", show_progress=False)
        runs[name] = [(r["output"], r["letter_argmax"]) for c in result.categories.values() for r in c.records]
    assert len(runs["base"]) == 12 and runs["identity"] == runs["base"]


def test_the_adapter_precision_policy_is_float32_on_every_device(tiny_llama_dir: Path) -> None:
    from flowertune_llm.models import build_peft_model

    assert {adapter_dtype(d) for d in ("cpu", "cuda", "cuda:1")} == {torch.float32}
    model = build_peft_model(parse_config(tiny_run_config(tiny_llama_dir)).model, "cpu", 0)
    for p in model.parameters():  # what TRL does to a quantized model's adapter
        if p.requires_grad:
            p.data = p.data.to(torch.bfloat16)
    apply_adapter_precision(model, "cuda")  # the policy as the GPU path asks for it
    assert {p.dtype for p in model.parameters() if p.requires_grad} == {torch.float32}


def test_trl_bf16_adapter_freezes_most_of_lora_a_at_the_reference_rate_and_the_app_policy_none(
    tiny_llama_dir: Path,
) -> None:
    """5 steps at lr 5e-5 (`train.learning-rate-max`): share of lora_A entries left unchanged."""
    from tests.benchmarks.gpu_check import lora_a_unchanged_shares

    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{
        "model.quantization": 4, "train.training-arguments.max-steps": 5,
        "train.training-arguments.lr-scheduler-type": "constant",
    }))
    shares = lora_a_unchanged_shares(cfg, steps=5)
    print(f"lora_A entries unchanged after 5 steps at 5e-5: {shares}")
    assert shares["trl-bf16"] > 0.5, shares
    assert shares["app-float32"] == 0.0, shares


def test_a_client_that_sees_two_gpus_keeps_its_batch_and_no_data_parallel(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """transformers' n_gpu is device_count() for one process; faked at 2, as on a two-GPU SuperNode."""
    from transformers import TrainingArguments
    from trl import SFTConfig, SFTTrainer

    from flowertune_llm.dataset import load_partition
    from flowertune_llm.models import initial_adapter
    from flowertune_llm.train import make_trainer

    monkeypatch.setattr(TrainingArguments, "n_gpu", property(lambda self: 2))
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{"train.training-arguments.per-device-train-batch-size": 16}))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    data = load_partition(cfg.dataset_name, 0, 20, cfg.train.seed, cfg.train.prompt_template)
    trainer = make_trainer(cfg, start, data, 1e-3, str(tmp_path / "app"), models=None)
    assert trainer.args.n_gpu == 1 and trainer.args.train_batch_size == 16
    batch = next(iter(trainer.get_train_dataloader()))
    assert len(batch["cu_seq_lens_q"]) - 1 == 16  # 16 rows (padding-free: end to end in one)
    assert not isinstance(trainer._wrap_model(trainer.model), torch.nn.DataParallel)
    # the control: plain TRL arguments under the same fake would multiply the batch; TRL 1.16 refuses the round
    plain = SFTConfig(output_dir=str(tmp_path / "plain"), use_cpu=True, per_device_train_batch_size=16, report_to="none")
    assert plain.train_batch_size == 32
    with pytest.raises(ValueError, match="DataParallel"):
        SFTTrainer(model=trainer.model, args=plain, train_dataset=trainer.train_dataset,
                   processing_class=trainer.processing_class)


@pytest.mark.parametrize("memory, share", [([], 0.0), ([8 * 10**9], 1.0), ([24 * 10**9], 0.5), ([141 * 10**9], 0.5),
                                           ([80 * 10**9, 80 * 10**9], 1.0)])
def test_the_default_gpu_share_follows_the_gpus_found(memory: list[int], share: float) -> None:
    from flowertune_llm.federation import default_gpu_share

    assert default_gpu_share(memory)[0] == share


def test_the_federation_command_picks_a_gpu_share_and_says_when_clients_train_on_cpu(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import tomllib

    import flowertune_llm.federation as federation
    from flowertune_llm.cli import main

    monkeypatch.setenv("FLWR_HOME", str(tmp_path))
    monkeypatch.setattr(federation, "detected_gpu_memory", lambda: [24 * 10**9])  # one 24 GB GPU
    assert main(["federation"]) == 0
    assert "0.5 GPU per ClientApp; one GPU with 24 GB" in capsys.readouterr().out
    options = tomllib.loads((tmp_path / "config.toml").read_text())["superlink"]["local"]["options"]
    assert options["backend"]["client-resources"]["num-gpus"] == 0.5
    assert main(["federation", "--num-gpus", "0"]) == 0
    assert "clients will train on CPU" in capsys.readouterr().out
    monkeypatch.setattr(federation, "detected_gpu_memory", lambda: [])
    assert main(["federation"]) == 0
    assert "0 GPU per ClientApp; no GPU found" in capsys.readouterr().out


def test_no_app_process_changes_rays_gpu_assignment() -> None:
    """RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0 in a process would let Ray's workers given 0 GPUs see every GPU."""
    import os
    import subprocess
    import sys

    code = ("import os, flowertune_llm.client_app, flowertune_llm.server_app, flowertune_llm.cli; "
            "print(os.environ.get('RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO', 'unset'))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.strip() == "unset"


def test_round_memory_reports_the_peak_of_the_round_not_of_the_process() -> None:
    from flowertune_llm.devices import RoundMemory

    big = torch.ones(200 * 2**20 // 4)  # 200 MB held, then freed: a peak before the round
    big += 1
    del big
    with RoundMemory("cpu") as memory:
        small = torch.ones(20 * 2**20 // 4)
        small += 1
        peak = memory.peak_mb()["peak_mem_mb"]
    if memory.reset:  # Linux: the high-water mark was reset when the round began
        import psutil

        assert peak < psutil.Process().memory_info().rss / 2**20 + 150  # not the earlier 200 MB peak on top
    assert peak > 0


def test_the_gpu_check_dry_run_passes_on_cpu(tmp_path: Path) -> None:
    """`python -m tests.benchmarks.gpu_check --device cpu`: every row runs and passes before GPU time is spent."""
    import json
    import subprocess
    import sys

    from tests.helpers import ROOT

    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, "-m", "tests.benchmarks.gpu_check", "--device", "cpu", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 5 and all(r["ok"] for r in rows.values()), rows
    assert "| (a) placement under Ray | pass |" in proc.stdout
