"""Bad input stops the run before any model is loaded, naming the key, writing nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

from flowertune_llm import server_app
from flowertune_llm.config import ConfigError, parse_config
from flowertune_llm.preflight import federation_warning, leaderboard_warnings, preflight
from tests.helpers import ALPACA_SUBSET, default_run_config, tiny_run_config


class NodesOnly:
    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(self.n))


def run_server(run_config: dict, tmp_path: Path) -> None:
    run_config = {**run_config, "train.output-dir": str(tmp_path / "results")}
    context = Context(run_id=1, node_id=0, node_config={}, state=RecordDict(), run_config=run_config)
    server_app.main(NodesOnly(20), context)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ({"model.quantization": 5}, "model.quantization=5"),
        ({"num-server-rounds": 0}, "num-server-rounds=0"),
        ({"strategy.fraction-train": 2.0}, "strategy.fraction-train=2.0"),
        ({"train.save-every-round": 0}, "train.save-every-round=0"),
        ({"static.dataset.name": "/no/such/file.jsonl"}, "static.dataset.name='/no/such/file.jsonl'"),
        ({"model.name": "/no/such/model"}, "model.name='/no/such/model'"),
        ({"eval.every-round": 1, "eval.data": "/no/such/mmlu_val.jsonl"}, "eval.data='/no/such/mmlu_val.jsonl': no such file"),
        ({"eval.every-round": 1, "eval.data": str(ALPACA_SUBSET)}, "eval.data="),
    ],
)
def test_bad_input_fails_fast_and_writes_nothing(
    override: dict, message: str, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    with pytest.raises(ConfigError) as err:
        run_server(tiny_run_config(tiny_llama_dir, **override), tmp_path)
    assert message in str(err.value)
    assert not (tmp_path / "results").exists()


def test_dataset_missing_a_column_is_refused(tmp_path: Path, tiny_llama_dir: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"instruction": "a", "input": "", "answer": "b"}) + "\n")
    with pytest.raises(ConfigError, match=r"static.dataset.name=.*missing required column\(s\) \['output'\]"):
        run_server(tiny_run_config(tiny_llama_dir, **{"static.dataset.name": str(bad)}), tmp_path)
    assert not (tmp_path / "results").exists()


def test_offline_mode_without_cache_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = parse_config(
        default_run_config(**{"model.name": "HuggingFaceTB/no-such-model-xyz", "static.dataset.name": str(ALPACA_SUBSET),
                               "eval.every-round": 0})
    )
    with pytest.raises(ConfigError, match="model.name='HuggingFaceTB/no-such-model-xyz': HF_HUB_OFFLINE is set"):
        preflight(cfg)


@pytest.mark.parametrize("key", ["model.name", "static.dataset.name"])
def test_unreachable_hub_stops_within_seconds(
    key: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    import time

    from flowertune_llm.hub import hub_reachable
    from tests.processes import free_port

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")  # nothing listens there
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    hub_reachable.cache_clear()
    overrides = {key: "someorg/not-cached"}
    start = time.monotonic()
    with pytest.raises(ConfigError, match=f"{key}='someorg/not-cached': the Hugging Face hub cannot be reached"):
        preflight(parse_config(tiny_run_config(tiny_llama_dir, **overrides)))
    assert time.monotonic() - start < 10
    hub_reachable.cache_clear()


def test_leaderboard_rules_are_reported_not_refused(tiny_llama_dir: Path) -> None:
    cfg = parse_config(tiny_run_config(tiny_llama_dir))
    assert any("static.dataset.name" in r for r in leaderboard_warnings(cfg))
    assert leaderboard_warnings(parse_config(default_run_config())) == []
    warning = federation_warning(2)
    assert warning is not None and "has 2 SuperNodes" in warning
    assert "`flowertune-llm federation`" in warning and '--federation-config "num-supernodes=20"' in warning
    assert "register and start 20 SuperNodes" in warning
    assert federation_warning(20) is None


def test_unreachable_eval_data_is_named_before_any_model_loads(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, tiny_llama_dir: Path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    cfg = tiny_run_config(tiny_llama_dir, **{"eval.every-round": 5, "eval.data": "cais/mmlu"})
    with pytest.raises(ConfigError, match="eval.data='cais/mmlu': HF_HUB_OFFLINE is set"):
        run_server(cfg, tmp_path)
    assert not (tmp_path / "results").exists()


def test_validation_questions_are_stratified_fixed_and_warn_on_the_test_split(caplog: pytest.LogCaptureFixture) -> None:
    from flowertune_llm.evaluate.validation import validation_questions
    from tests.helpers import MMLU_DIR, MMLU_VAL

    cfg = parse_config(default_run_config(**{"eval.data": str(MMLU_VAL), "eval.questions": 30}))
    first = validation_questions(cfg.eval)
    assert {c: len(q) for c, q in first.items()} == {"stem": 10, "social_sciences": 10, "humanities": 10}
    assert validation_questions(cfg.eval) == first  # the same questions every time
    folder = parse_config(default_run_config(**{"eval.data": str(MMLU_DIR), "eval.questions": 30}))
    assert validation_questions(folder.eval) == first  # a folder: its *val* file
    assert "test split" not in caplog.text
    test_split = parse_config(default_run_config(**{"eval.data": str(MMLU_DIR / "mmlu_test.jsonl")}))
    validation_questions(test_split.eval)
    assert "looks like the MMLU test split" in caplog.text


def test_chat_template_is_required_for_the_chat_prompt(tmp_path: Path, tiny_llama_dir: Path) -> None:
    import shutil

    plain = tmp_path / "no-chat-template"
    shutil.copytree(tiny_llama_dir, plain)
    config = json.loads((plain / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (plain / "tokenizer_config.json").write_text(json.dumps(config))
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ConfigError, match="train.prompt-template='chat': the tokenizer of model.name=.* has no chat template"):
        run_server(tiny_run_config(plain, **{"train.prompt-template": "chat"}), tmp_path)
    assert not (tmp_path / "results").exists()


def test_an_expected_error_logs_one_line_and_the_exit_block_shrinks() -> None:
    import io
    import logging

    from flowertune_llm.logs import OneLineErrors

    logger = logging.getLogger("flowertune-test-one-line")
    stream = io.StringIO()
    logger.addHandler(logging.StreamHandler(stream))
    logger.addFilter(OneLineErrors((ConfigError,)))
    logger.propagate = False
    try:
        parse_config(default_run_config(**{"model.quantization": 16}))
    except ConfigError as exc:
        logger.error("%s raised an exception", "Simulation", exc_info=exc)
    logger.error("Exit Code: 700\n\nAn unhandled exception occurred.\n\nFor more information, visit: <url>")
    try:
        raise RuntimeError("a bug")
    except RuntimeError as exc:
        logger.error("%s raised an exception", "ServerApp", exc_info=exc)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "Run stopped: model.quantization=16: expected 4, 8, or none (0)"
    assert lines[1] == "Exit Code: 700 (run failed; see the line above)"
    assert lines[2] == "ServerApp raised an exception" and "Traceback" in lines[3]  # real bugs keep theirs


def test_known_third_party_notices_are_dropped_and_other_lines_kept() -> None:
    import io
    import logging
    import warnings

    import flowertune_llm  # noqa: F401  (installs the filters, as in every app process)

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    flwr_logger = logging.getLogger("flwr")
    flwr_logger.addHandler(handler)
    try:
        for message in ("\t├── ConfigRecord (train): (empty!)", "Initial global evaluation results: None",
                        "Manually terminating ClientAppActor", "[round 1/2] train_loss=2.1 clients=2",
                        "fraction_evaluate is set to 0.0. Federated evaluation will be skipped."):
            flwr_logger.warning(message)
    finally:
        flwr_logger.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["[round 1/2] train_loss=2.1 clients=2"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        from flowertune_llm.logs import quiet_third_party

        quiet_third_party()
        warnings.warn("`gradient_checkpointing_enable` is deprecated and will be removed in v6.", FutureWarning,
                      stacklevel=1)
        warnings.warn("something the user should see", FutureWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["something the user should see"]


def test_a_training_argument_trl_refuses_stops_the_server_before_any_model_loads(
    tmp_path: Path, tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import flowertune_llm.server_app as app_module

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(app_module, "initial_adapter", never)
    overrides = {"train.training-arguments.lr-scheduler-type": "bogus", "eval.every-round": 1}
    with pytest.raises(ConfigError, match=r"^train.training-arguments.lr-scheduler-type='bogus': bogus is not a valid"):
        run_server(tiny_run_config(tiny_llama_dir, **overrides), tmp_path)
    assert not (tmp_path / "results").exists()
