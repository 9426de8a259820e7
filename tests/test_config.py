"""Config parsing/validation and the LR schedule."""

from __future__ import annotations

import math

import pytest

from flowertune_llm.config import ConfigError, cosine_lr, parse_config
from tests.helpers import default_run_config


def test_pyproject_defaults_match_the_reference_baseline() -> None:
    cfg = parse_config(default_run_config())
    assert cfg.model.name == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert cfg.model.quantization == 4
    assert (cfg.model.lora.r, cfg.model.lora.alpha, cfg.model.lora.dropout) == (8, 16, 0.075)
    assert cfg.model.lora.use_dora and cfg.model.lora.target_modules == ()
    assert cfg.num_server_rounds == 100 and cfg.train.save_every_round == 5
    assert cfg.strategy.fraction_train == 0.1
    assert cfg.dataset_name == "flwrlabs/alpaca-gpt4" and cfg.is_leaderboard_dataset
    assert cfg.train.dynamic_data_seed
    ta = dict(cfg.train.training_arguments)
    assert ta["per_device_train_batch_size"] == 16 and ta["max_steps"] == 10
    assert ta["gradient_accumulation_steps"] == 1 and ta["lr_scheduler_type"] == "constant"
    assert cfg.train.seq_length == 512
    assert cfg.train.prompt_template == "alpaca"
    assert (cfg.eval.every_round, cfg.eval.questions, cfg.eval.data) == (5, 999, "cais/mmlu")
    assert [r for r in range(101) if cfg.eval.due(r, 100)] == list(range(0, 101, 5))


def test_evaluation_rounds_include_the_last_one() -> None:
    cfg = parse_config(default_run_config(**{"num-server-rounds": 7, "eval.every-round": 3}))
    assert [r for r in range(8) if cfg.eval.due(r, 7)] == [0, 3, 6, 7]
    off = parse_config(default_run_config(**{"eval.every-round": 0}))
    assert not off.eval.enabled and not any(off.eval.due(r, 100) for r in range(101))


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("model.quantization", 3, "model.quantization=3"),
        ("model.quantization", "fp16", "model.quantization='fp16'"),
        ("num-server-rounds", 0, "num-server-rounds=0"),
        ("num-server-rounds", -5, "num-server-rounds=-5"),
        ("strategy.fraction-train", 0.0, "strategy.fraction-train=0.0"),
        ("strategy.fraction-train", 1.5, "strategy.fraction-train=1.5"),
        ("strategy.fraction-evaluate", -0.1, "strategy.fraction-evaluate=-0.1"),
        ("train.save-every-round", 0, "train.save-every-round=0"),
        ("model.lora.peft-lora-r", 0, "model.lora.peft-lora-r=0"),
        ("model.lora.peft-lora-dropout", 1.0, "model.lora.peft-lora-dropout=1.0"),
        ("train.learning-rate-min", 1.0, "train.learning-rate-min=1.0"),
        ("model.name", "", "model.name=''"),
        ("model.gradient-checkpointing", "yes", "model.gradient-checkpointing='yes'"),
        ("train.training-arguments.max-steps", 0, "max-steps=0"),
        ("train.training-arguments.per-device-train-batch-size", 0, "per-device-train-batch-size=0"),
        ("train.prompt-template", "vicuna", "train.prompt-template='vicuna': expected one of alpaca, chat, qa, mcq"),
        ("train.mcq-fraction", 1.5, "train.mcq-fraction=1.5: must be in [0, 1]"),
        ("eval.every-round", -1, "eval.every-round=-1"),
        ("eval.questions", 2, "eval.questions=2"),
        ("eval.batch-size", 0, "eval.batch-size=0"),
        ("eval.data", "", "eval.data=''"),
    ],
)
def test_bad_values_name_the_key_and_value(key: str, value: object, fragment: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(default_run_config(**{key: value}))
    assert fragment in str(err.value)


def test_unknown_training_argument_is_refused_by_name() -> None:
    from flowertune_llm.train import check_training_arguments

    cfg = parse_config(default_run_config(**{"train.training-arguments.no-such-field": 1}))  # parsing stays light
    with pytest.raises(ConfigError, match="train.training-arguments.no-such-field: 'no_such_field' is not a field"):
        check_training_arguments(cfg)


def test_training_arguments_owned_by_the_app_point_to_the_right_key() -> None:
    with pytest.raises(ConfigError, match="train.learning-rate-max"):
        parse_config(default_run_config(**{"train.training-arguments.learning-rate": 1e-3}))


def test_missing_key_is_named() -> None:
    cfg = default_run_config()
    del cfg["train.seq-length"]
    with pytest.raises(ConfigError, match="missing config key 'train.seq-length'"):
        parse_config(cfg)


@pytest.mark.parametrize(("value", "bits"), [(4, 4), (8, 8), ("none", 0), (0, 0), ("4", 4)])
def test_quantization_accepts_4_8_and_none(value: object, bits: int) -> None:
    assert parse_config(default_run_config(**{"model.quantization": value})).model.quantization == bits


def test_target_modules_and_dataset_override() -> None:
    cfg = parse_config(
        default_run_config(
            **{"model.lora.target-modules": "q_proj, k_proj,v_proj", "static.dataset.name": "x.jsonl"}
        )
    )
    assert cfg.model.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert not cfg.is_leaderboard_dataset


def test_cosine_lr_schedule_matches_formula() -> None:
    lr_max, lr_min, n = 5e-5, 1e-6, 100
    assert cosine_lr(0, n, lr_max, lr_min) == pytest.approx(lr_max)
    assert cosine_lr(n, n, lr_max, lr_min) == pytest.approx(lr_min)
    assert cosine_lr(50, n, lr_max, lr_min) == pytest.approx((lr_max + lr_min) / 2)
    for rnd in (1, 17, 73):
        expected = lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * rnd / n))
        assert cosine_lr(rnd, n, lr_max, lr_min) == pytest.approx(expected)
    values = [cosine_lr(r, n, lr_max, lr_min) for r in range(n + 1)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert parse_config(default_run_config()).lr(1) == pytest.approx(cosine_lr(1, n, lr_max, lr_min))


def test_fingerprint_changes_with_training_settings() -> None:
    a = parse_config(default_run_config())
    b = parse_config(default_run_config(**{"model.lora.peft-lora-r": 16}))
    assert a.fingerprint() == parse_config(default_run_config()).fingerprint()
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ("num-server-round=3", "unknown key 'num-server-round' (did you mean num-server-rounds?)"),
        ("model.lora.peft-lora-rank=16", "unknown key 'model.lora.peft-lora-rank' (did you mean model.lora.peft-lora-r?)"),
        ("model.quantization=16", "model.quantization=16: expected 4, 8, or none (0)"),
        ("strategy.fraction-train=0", "strategy.fraction-train=0"),
    ],
)
def test_check_command_names_bad_keys_and_values(
    run_config: str, message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from flowertune_llm.cli import main
    from tests.helpers import ROOT

    assert main(["check", "--app", str(ROOT), run_config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err
    assert len(err.splitlines()) == 1
    assert main(["check", "--app", str(ROOT), "num-server-rounds=3 train.prompt-template='qa'"]) == 0
    assert capsys.readouterr().out.startswith("ok: ")


def app_with_training_arguments(tmp_path, **extra: object):  # noqa: ANN001, ANN201
    """A copy of this app's pyproject whose config also lists these training arguments (as a user adds them)."""
    from tests.helpers import ROOT

    text = (ROOT / "pyproject.toml").read_text()
    import json

    lines = "".join(f"train.training-arguments.{k} = {json.dumps(v)}\n" for k, v in extra.items())
    anchor = "train.training-arguments.report-to"
    (tmp_path / "pyproject.toml").write_text(text.replace(anchor, lines + anchor, 1))
    return tmp_path


@pytest.mark.parametrize(
    ("run_config", "message"),
    [
        ("train.training-arguments.lr-scheduler-type='bogus'",
         "error: train.training-arguments.lr-scheduler-type='bogus': bogus is not a valid SchedulerType"),
        ("train.training-arguments.optim='adamw_bogus'",
         "error: train.training-arguments.optim='adamw_bogus': adamw_bogus is not a valid OptimizerNames"),
        # TRL refuses load_best_model_at_end unless saving follows evaluation; the app never saves during a round
        ("train.training-arguments.load-best-model-at-end=true train.training-arguments.eval-strategy='steps'",
         "error: train.training-arguments.eval-strategy='steps' with train.training-arguments.load-best-model-at-end="
         "True: --load_best_model_at_end requires the save and eval strategy to match"),
    ],
)
def test_check_refuses_what_trl_refuses_naming_the_key(
    run_config: str, message: str, tmp_path, capsys: pytest.CaptureFixture[str]  # noqa: ANN001
) -> None:
    from flowertune_llm.cli import main

    app = app_with_training_arguments(tmp_path, optim="adamw_torch", **{"load-best-model-at-end": False},
                                      **{"eval-strategy": "no"})
    assert main(["check", "--app", str(app), "num-server-rounds=3"]) == 0  # the added defaults are valid
    capsys.readouterr()
    assert main(["check", "--app", str(app), run_config]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(message) and len(err.splitlines()) == 1 and len(err) < 320, err


def test_the_shipped_training_arguments_pass_trls_checks() -> None:
    from flowertune_llm.train import check_training_arguments

    check_training_arguments(parse_config(default_run_config()))


def test_check_validates_the_sftconfig_every_client_builds_cpu_and_gpu(tmp_path, capsys) -> None:  # noqa: ANN001
    """fp16 added to the pyproject (as a user adds a field): a CPU client accepts it, every bf16 GPU client refuses
    it (fp16 and bf16 together). `check` builds both and names the key, with no override touching the trainer."""
    from flowertune_llm.cli import main

    app = app_with_training_arguments(tmp_path, fp16=True)
    assert main(["check", "--app", str(app), "num-server-rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.training-arguments.fp16=True: At most one of fp16 and bf16"), err
    assert "as a GPU client builds it" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("field", ["use-cpu", "bf16", "save-strategy", "completion-only-loss", "disable-tqdm",
                                   "gradient-checkpointing-kwargs", "padding-free"])
def test_training_arguments_the_app_overwrites_are_refused_by_name(field: str) -> None:
    with pytest.raises(ConfigError, match=f"train.training-arguments.{field}: set by the app"):
        parse_config(default_run_config(**{f"train.training-arguments.{field}": "x"}))


def test_every_field_the_app_sets_on_a_client_is_refused_as_a_key() -> None:
    """The app's own SFTConfig fields (train.app_training_arguments) and the refused keys are one list."""
    from flowertune_llm.config import OWNED_TRAINING_ARGUMENTS
    from flowertune_llm.train import app_training_arguments

    cfg = parse_config(default_run_config())
    assert set(app_training_arguments(cfg, 1e-4, "/tmp", "cpu")) <= set(OWNED_TRAINING_ARGUMENTS)


def test_the_shipped_trainer_inputs_are_the_validated_ones() -> None:
    """`check` skips TRL for exactly the inputs validated here: the shipped defaults, in both client variants."""
    from flowertune_llm.config import VALIDATED_TRAINER_INPUTS, trainer_inputs
    from flowertune_llm.train import check_training_arguments

    cfg = parse_config(default_run_config())
    check_training_arguments(cfg)
    assert trainer_inputs(cfg) == VALIDATED_TRAINER_INPUTS
    assert trainer_inputs(parse_config(default_run_config(**{"train.seq-length": 256}))) != VALIDATED_TRAINER_INPUTS


def test_check_names_a_layout_refused_beside_padding_free(tmp_path, capsys) -> None:  # noqa: ANN001
    from flowertune_llm.cli import main

    app = app_with_training_arguments(tmp_path, packing=True)
    assert main(["check", "--app", str(app), "num-server-rounds=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: train.training-arguments.packing=True with train.padding-free=true"), err
    assert main(["check", "--app", str(app), "train.padding-free=false"]) == 0  # the user's own choice without it


@pytest.mark.parametrize(("value", "cpu", "gpu"), [("auto", False, True), (True, True, True), (False, False, False),
                                                   ("true", True, True)])
def test_gradient_checkpointing_auto_is_off_on_a_cpu_and_on_for_a_gpu(value: object, cpu: bool, gpu: bool) -> None:
    settings = parse_config(default_run_config(**{"model.gradient-checkpointing": value})).model
    assert (settings.checkpointing("cpu"), settings.checkpointing("cuda")) == (cpu, gpu)
    assert parse_config(default_run_config()).model.gradient_checkpointing is None  # the shipped default: auto
