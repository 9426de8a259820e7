"""Flat Flower run_config (``"a.b-c"`` keys) -> one frozen, validated, typed object.

The defaults live in one place only: ``[tool.flwr.app.config]`` in ``pyproject.toml``.
Flower always passes every key, so a missing key here is an error, not a silent default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from flowertune_llm.prompts import MCQ_OPTIONS, PROMPT_TEMPLATES

#: SFTConfig fields this app derives from other keys; users set those keys instead.
OWNED_TRAINING_ARGUMENTS = {
    "learning_rate": "train.learning-rate-max / train.learning-rate-min",
    "output_dir": "train.output-dir (the app trains in a temporary folder)",
    "max_length": "train.seq-length",
    "gradient_checkpointing": "model.gradient-checkpointing",
    "seed": "train.seed",
    "padding_free": "train.padding-free (the app's collator and attention; TRL's own refuses max_length)",
    # ... and fields the app sets on every client whatever the user says (train.sft_config):
    "completion_only_loss": "nothing: the loss is always on the response (+ EOS) only",
    "gradient_checkpointing_kwargs": "model.gradient-checkpointing (always non-reentrant)",
    "use_cpu": "nothing: a client trains on the device it has",
    "bf16": "nothing: bf16 autocast on GPUs that support it; on a CPU train.cpu-compute",
    "save_strategy": "nothing: the server saves the global adapter (train.save-every-round)",
    "disable_tqdm": "nothing: the server logs one line per round",
}
#: `train.cpu-compute`: `auto` measures which dtype this CPU trains faster in (devices.training_compute).
CPU_COMPUTE = ("auto", "float32", "bfloat16")
_TA_PREFIX = "train.training-arguments."
_QUANTIZATION_VALUES = {"4": 4, "8": 8, "0": 0, "none": 0}


class ConfigError(ValueError):
    """A run_config value is invalid; the message names the key and the value."""


@dataclass(frozen=True)
class LoraSettings:
    """LoRA/DoRA adapter hyper-parameters."""

    r: int
    alpha: int
    dropout: float
    use_dora: bool
    target_modules: tuple[str, ...]  # () = PEFT's default for the architecture


@dataclass(frozen=True)
class ModelSettings:
    """Which base model to load and how."""

    name: str
    quantization: int  # 4, 8, or 0 (= none, full precision)
    gradient_checkpointing: bool | None  # None = "auto": on a GPU, off on a CPU (`checkpointing`)
    lora: LoraSettings

    def checkpointing(self, device: str) -> bool:
        """Whether a model on `device` recomputes activations: `auto` on for GPUs (memory), off for CPUs (speed: a
        padding-free bf16 step has ~6 GB of activations at the reference recipe, docs/benchmarks.md)."""
        if self.gradient_checkpointing is None:
            return not device.startswith("cpu")
        return self.gradient_checkpointing


@dataclass(frozen=True)
class TrainSettings:
    """Per-round local training and the server-side LR schedule and checkpoints."""

    save_every_round: int
    learning_rate_max: float
    learning_rate_min: float
    seq_length: int
    seed: int
    output_dir: str
    resume_from: str  # "" = fresh run; else a peft_<N> folder or a run folder
    prompt_template: str  # "alpaca", "chat", "qa" or "mcq" (see prompts.py)
    mcq_fraction: float  # mcq: share of rows turned into multiple-choice questions
    mcq_rotations: bool  # mcq: each question in its four cyclic rotations, in the same round (schedule.rotation_order)
    mcq_balance: float  # mcq: weight of the letter-balance term (train.letter_balance); 0 = off
    mcq_options: str  # mcq: "random" (other rows' outputs, whole) or "similar" (like MMLU's: see prompts.py)
    dynamic_data_seed: bool  # a new row order each round (schedule.row_order); False: the same order every round
    release_memory: bool  # CPU: glibc returns large freed buffers at once (devices.release_memory_to_os)
    padding_free: bool  # a step computes real tokens only: rows end to end, attention per row (padding_free.py)
    cpu_compute: str  # CPU training dtype: "auto" (measured), "float32" or "bfloat16" (devices.training_compute)
    training_arguments: tuple[tuple[str, Any], ...]  # SFTConfig field (snake_case) -> value

    @property
    def rotates(self) -> bool:
        """True when the run trains mcq questions in their four rotations (and orders each round's rows itself)."""
        return self.prompt_template == "mcq" and self.mcq_rotations

    @property
    def batch_size(self) -> int:
        """Examples per device and step (transformers' default 8 where unset)."""
        return int(dict(self.training_arguments).get("per_device_train_batch_size", 8))

    @property
    def num_epochs(self) -> float:
        """Epochs a round trains when max-steps is -1 (transformers' default 3 where unset)."""
        return float(dict(self.training_arguments).get("num_train_epochs", 3.0))

    @property
    def epoch_passes(self) -> int:
        """Epoch orders a round by epochs lays end to end (`schedule.epoch_orders`): `num_epochs` rounded up; the
        trainer then runs `num_epochs / epoch_passes` epochs over them, reading each once."""
        return max(1, math.ceil(self.num_epochs))

    @property
    def examples_per_round(self) -> int | None:
        """max-steps x batch x accumulation: the examples one local round trains on (None: it trains by epochs)."""
        args = dict(self.training_arguments)
        steps = int(args.get("max_steps", -1))
        return steps * self.batch_size * int(args.get("gradient_accumulation_steps", 1)) if steps > 0 else None

    def rows_per_round(self, num_rows: int) -> int:
        """Distinct rows of a `num_rows` partition one local round trains on (transformers' defaults where unset).

        Exact, except with mcq rotations, where a question row is four examples: then the expected
        count (1 + 3 x mcq-fraction examples a row), what `check`'s coverage line predicts; the
        clients report their exact count.
        """
        from flowertune_llm.schedule import rows_per_round

        args = dict(self.training_arguments)
        per_row = 1 + 3 * self.mcq_fraction if self.rotates else 1
        examples = rows_per_round(math.ceil(num_rows * per_row), int(args.get("max_steps", -1)), self.batch_size,
                                  int(args.get("gradient_accumulation_steps", 1)),
                                  float(args.get("num_train_epochs", 3.0)))
        return min(num_rows, int(examples / per_row))


@dataclass(frozen=True)
class CommSettings:
    """How adapters travel and how the run is logged."""

    dtype: str  # "float32" (reference figures) or "bf16" (half the bytes)
    tensorboard: bool


@dataclass(frozen=True)
class TrackingSettings:
    """Experiment trackers the ServerApp logs to (tracking.py), and the sweep that tags its runs."""

    backends: tuple[str, ...]  # of tracking.BACKENDS; empty: metrics.jsonl (and TensorBoard if asked) only
    project: str  # W&B / trackio project, MLflow experiment
    uri: str  # MLflow tracking URI; empty: sqlite:///<train.output-dir>/mlflow.db
    wandb_mode: str  # "offline" (wandb sync later) or "online"
    clients: bool  # each client's TRL trainer reports too (one tracker run per client per round)
    sweep_name: str = ""
    sweep_point: str = ""


@dataclass(frozen=True)
class EvalSettings:
    """The server's in-training MMLU evaluation (official protocol, validation split)."""

    every_round: int  # 0 = off; else rounds 0, N, 2N, ... and the last
    questions: int  # stratified: questions // 3 per leaderboard category
    data: str  # hub id (its validation split) or a local MMLU file or folder
    batch_size: int
    allow_inexact_batching: bool

    @property
    def enabled(self) -> bool:
        """True when the run evaluates at all."""
        return self.every_round > 0

    def due(self, server_round: int, num_rounds: int) -> bool:
        """Whether the global adapter after `server_round` is evaluated (0 = the untrained one)."""
        return self.enabled and (server_round % self.every_round == 0 or server_round == num_rounds)


_ADAPTIVE = {"eta": "eta", "eta-l": "eta_l", "beta-1": "beta_1", "beta-2": "beta_2", "tau": "tau"}
#: The one strategy registry: strategy.name -> (the Flower strategy class in flwr.serverapp.strategy,
#: its own hyper-parameter keys under strategy. -> its keyword arguments). strategy.build_strategy reads it.
STRATEGIES: dict[str, tuple[str, dict[str, str]]] = {
    "fedavg": ("FedAvg", {}),
    "fedprox": ("FedProx", {"proximal-mu": "proximal_mu"}),
    "fedavgm": ("FedAvgM", {"server-learning-rate": "server_learning_rate", "server-momentum": "server_momentum"}),
    "fedadam": ("FedAdam", _ADAPTIVE),
    "fedyogi": ("FedYogi", _ADAPTIVE),
    "fedadagrad": ("FedAdagrad", {"eta": "eta", "eta-l": "eta_l", "tau": "tau"}),
}


@dataclass(frozen=True)
class StrategySettings:
    """Aggregation strategy, its hyper-parameters, and client sampling."""

    name: str
    params: tuple[tuple[str, float], ...]  # the chosen strategy's kwargs
    fraction_train: float
    fraction_evaluate: float
    min_replies: int
    round_timeout: float | None  # seconds a round waits for replies; None = "auto" (strategy.round_timeout)


@dataclass(frozen=True)
class DPSettings:
    """Central differential privacy with client-side fixed clipping (opt-in)."""

    enabled: bool
    noise_multiplier: float
    clipping_norm: float


@dataclass(frozen=True)
class Config:
    """The whole run configuration, validated once and passed around."""

    num_server_rounds: int
    dataset_name: str
    model: ModelSettings
    train: TrainSettings
    strategy: StrategySettings
    comm: CommSettings
    dp: DPSettings
    eval: EvalSettings
    tracking: TrackingSettings

    @property
    def is_leaderboard_dataset(self) -> bool:
        """True when the dataset is the leaderboard's static one (rules.py; either hub copy of its rows)."""
        from flowertune_llm import rules

        return self.dataset_name in (rules.DATASET, rules.DATASET_BEFORE_2025_04_08)

    def lr(self, server_round: int) -> float:
        """The learning rate of a round, from the cosine schedule over all rounds."""
        return cosine_lr(
            server_round,
            self.num_server_rounds,
            self.train.learning_rate_max,
            self.train.learning_rate_min,
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-friendly view (for logs and checkpoint metadata)."""
        return dataclasses.asdict(self)

    def fingerprint(self) -> str:
        """Stable short hash of the resolved config."""
        blob = json.dumps(self.to_dict(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def cosine_lr(server_round: int, num_rounds: int, lr_max: float, lr_min: float) -> float:
    """Cosine annealing over rounds, as in the FlowerTune baseline."""
    return lr_min + 0.5 * (lr_max - lr_min) * (1 + math.cos(math.pi * server_round / num_rounds))


def _require(cfg: Mapping[str, Any], key: str) -> Any:
    if key not in cfg:
        raise ConfigError(f"missing config key '{key}' (see [tool.flwr.app.config])")
    return cfg[key]


def _as_int(cfg: Mapping[str, Any], key: str, minimum: int | None = None) -> int:
    value = _require(cfg, key)
    try:
        ok = not isinstance(value, bool) and float(value) == int(value)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ConfigError(f"{key}={value!r}: expected an integer")
    if minimum is not None and int(value) < minimum:
        raise ConfigError(f"{key}={value!r}: must be >= {minimum}")
    return int(value)


def _as_float(cfg: Mapping[str, Any], key: str) -> float:
    value = _require(cfg, key)
    try:
        as_float = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        as_float = math.nan
    if not math.isfinite(as_float):
        raise ConfigError(f"{key}={value!r}: expected a finite number")
    return as_float


def _as_bool(cfg: Mapping[str, Any], key: str) -> bool:
    value = _require(cfg, key)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r}: expected true or false")
    return value


def _is_auto(value: Any) -> bool:
    """Whether a key's value is "auto" (the app decides)."""
    return isinstance(value, str) and value.strip().lower() == "auto"


def _as_bool_or_auto(cfg: Mapping[str, Any], key: str) -> bool | None:
    """true / false, or "auto" (None: the app decides per device)."""
    if _is_auto(_require(cfg, key)):
        return None
    try:
        return _as_bool(cfg, key)
    except ConfigError:
        raise ConfigError(f"{key}={cfg[key]!r}: expected \"auto\", true or false") from None


def _as_str(cfg: Mapping[str, Any], key: str, allow_empty: bool = False) -> str:
    value = _require(cfg, key)
    if not isinstance(value, str) or (not allow_empty and not value.strip()):
        raise ConfigError(f"{key}={value!r}: expected a non-empty string")
    return value.strip()


def _fraction(cfg: Mapping[str, Any], key: str, allow_zero: bool) -> float:
    value = _as_float(cfg, key)
    if not ((value >= 0.0 if allow_zero else value > 0.0) and value <= 1.0):
        raise ConfigError(f"{key}={value!r}: must be in {'[0, 1]' if allow_zero else '(0, 1]'}")
    return value


def _choice(cfg: Mapping[str, Any], key: str, choices: tuple[str, ...]) -> str:
    value = _require(cfg, key)
    if value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}")
    return value


def _quantization(cfg: Mapping[str, Any]) -> int:
    value = _require(cfg, "model.quantization")
    text = str(value).strip().lower()
    if isinstance(value, (bool, float)) or text not in _QUANTIZATION_VALUES:
        raise ConfigError(f"model.quantization={value!r}: expected 4, 8, or none (0)")
    return _QUANTIZATION_VALUES[text]


def trainer_inputs(cfg: Config) -> str:
    """A fingerprint of everything a client's SFTConfig is built from (train.sft_config): equal fingerprints, equal
    SFTConfigs. `check` runs TRL's own checks unless it equals `VALIDATED_TRAINER_INPUTS`."""
    t = cfg.train
    blob = json.dumps([t.training_arguments, t.seq_length, t.learning_rate_max, t.seed, t.dynamic_data_seed, t.rotates,
                       cfg.model.gradient_checkpointing], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


#: `trainer_inputs` of the shipped pyproject defaults, which tests/test_config.py validates with TRL on every run
#: (and checks this value against): a config with the same inputs needs no TRL to be known valid.
VALIDATED_TRAINER_INPUTS = "dec0666100078407"


def training_argument_key(name: str) -> str:
    """The run-config key of an SFTConfig field (`lr_scheduler_type` -> `train.training-arguments.lr-scheduler-type`)."""
    return f"{_TA_PREFIX}{name.replace('_', '-')}"


def _training_arguments(cfg: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The `train.training-arguments.*` keys as SFTConfig fields, with the app's own checks.

    Whether TRL knows and accepts them is checked by `train.check_training_arguments` (it loads
    TRL), which preflight and `check` run: parsing stays light.
    """
    out = []
    for key in sorted(k for k in cfg if k.startswith(_TA_PREFIX)):
        name = key[len(_TA_PREFIX) :].replace("-", "_")
        if name in OWNED_TRAINING_ARGUMENTS:
            raise ConfigError(f"{key}: set by the app; use {OWNED_TRAINING_ARGUMENTS[name]}")
        out.append((name, cfg[key]))
    for name in ("per_device_train_batch_size", "gradient_accumulation_steps"):
        if f"{_TA_PREFIX}{name.replace('_', '-')}" in cfg:
            _as_int(cfg, f"{_TA_PREFIX}{name.replace('_', '-')}", minimum=1)
    steps_key = f"{_TA_PREFIX}max-steps"
    if steps_key in cfg and _as_int(cfg, steps_key) == 0:
        raise ConfigError(f"{steps_key}=0: must be > 0 (or -1 to train by epochs)")
    return tuple(out)


def _mcq_settings(train: TrainSettings) -> None:
    """The mcq keys that only make sense together (checked for the mcq template only)."""
    if not 0.0 <= train.mcq_balance < math.inf:
        raise ConfigError(f"train.mcq-balance={train.mcq_balance!r}: must be >= 0 (0 = off)")
    if train.prompt_template != "mcq":
        return
    if train.mcq_balance > 0 and not train.mcq_rotations:
        raise ConfigError(f"train.mcq-balance={train.mcq_balance!r} needs train.mcq-rotations=true: the term is "
                          "taken over each question's four rotations")
    if train.mcq_rotations and train.batch_size % 4:
        raise ConfigError(f"{_TA_PREFIX}per-device-train-batch-size={train.batch_size} with train.mcq-rotations=true: "
                          "must be a multiple of 4, so a question's four rotations share a batch")


def _padding_free_settings(train: TrainSettings) -> None:
    """Training arguments that change how a batch is laid out, refused beside train.padding-free=true by name."""
    if not train.padding_free:
        return
    args = dict(train.training_arguments)
    for name, why in (("packing", "packs rows itself"), ("pad_to_multiple_of", "pads rows the app does not pad")):
        if args.get(name) not in (None, False):
            raise ConfigError(f"{training_argument_key(name)}={args[name]!r} with train.padding-free=true: TRL {why}; "
                              "set train.padding-free=false to use it")


def parse_config(run_config: Mapping[str, Any]) -> Config:
    """Validate a flat run_config and build the typed Config; errors name the key."""
    targets = _as_str(run_config, "model.lora.target-modules", allow_empty=True)
    lora = LoraSettings(
        r=_as_int(run_config, "model.lora.peft-lora-r", minimum=1),
        alpha=_as_int(run_config, "model.lora.peft-lora-alpha", minimum=1),
        dropout=_as_float(run_config, "model.lora.peft-lora-dropout"),
        use_dora=_as_bool(run_config, "model.lora.use-dora"),
        target_modules=tuple(t.strip() for t in targets.split(",") if t.strip()),
    )
    if not 0.0 <= lora.dropout < 1.0:
        raise ConfigError(f"model.lora.peft-lora-dropout={lora.dropout!r}: must be in [0, 1)")
    train = TrainSettings(
        save_every_round=_as_int(run_config, "train.save-every-round", minimum=1),
        learning_rate_max=_as_float(run_config, "train.learning-rate-max"),
        learning_rate_min=_as_float(run_config, "train.learning-rate-min"),
        seq_length=_as_int(run_config, "train.seq-length", minimum=8),
        seed=_as_int(run_config, "train.seed", minimum=0),
        output_dir=_as_str(run_config, "train.output-dir"),
        resume_from=_as_str(run_config, "train.resume-from", allow_empty=True),
        prompt_template=_choice(run_config, "train.prompt-template", PROMPT_TEMPLATES),
        mcq_fraction=_as_float(run_config, "train.mcq-fraction"),
        mcq_rotations=_as_bool(run_config, "train.mcq-rotations"),
        mcq_balance=_as_float(run_config, "train.mcq-balance"),
        mcq_options=_choice(run_config, "train.mcq-options", MCQ_OPTIONS),
        dynamic_data_seed=_as_bool(run_config, "train.dynamic-data-seed"),
        release_memory=_as_bool(run_config, "train.release-memory"),
        padding_free=_as_bool(run_config, "train.padding-free"),
        cpu_compute=_choice(run_config, "train.cpu-compute", CPU_COMPUTE),
        training_arguments=_training_arguments(run_config),
    )
    strategy_key = f"{_TA_PREFIX}train-sampling-strategy"
    if run_config.get(strategy_key, "random") != "random":
        if train.dynamic_data_seed:
            raise ConfigError(
                f"{strategy_key}={run_config[strategy_key]!r}: train.dynamic-data-seed=true orders each round's rows "
                "itself; set train.dynamic-data-seed=false to use another sampling strategy"
            )
        if train.rotates:
            raise ConfigError(f"{strategy_key}={run_config[strategy_key]!r}: train.mcq-rotations=true orders each "
                              "round's rows itself (a question's rotations together)")
    if not 0.0 <= train.mcq_fraction <= 1.0:
        raise ConfigError(f"train.mcq-fraction={train.mcq_fraction!r}: must be in [0, 1]")
    _mcq_settings(train)
    _padding_free_settings(train)
    if not 0.0 <= train.learning_rate_min <= train.learning_rate_max:
        raise ConfigError(
            f"train.learning-rate-min={train.learning_rate_min!r}: must be in "
            f"[0, train.learning-rate-max={train.learning_rate_max!r}]"
        )
    return Config(
        num_server_rounds=_as_int(run_config, "num-server-rounds", minimum=1),
        dataset_name=_as_str(run_config, "static.dataset.name"),
        model=ModelSettings(
            name=_as_str(run_config, "model.name"),
            quantization=_quantization(run_config),
            gradient_checkpointing=_as_bool_or_auto(run_config, "model.gradient-checkpointing"),
            lora=lora,
        ),
        train=train,
        strategy=_strategy(run_config),
        comm=CommSettings(
            dtype=_choice(run_config, "comm.dtype", ("float32", "bf16")),
            tensorboard=_as_bool(run_config, "metrics.tensorboard"),
        ),
        dp=_dp(run_config),
        eval=EvalSettings(
            every_round=_as_int(run_config, "eval.every-round", minimum=0),
            questions=_as_int(run_config, "eval.questions", minimum=3),
            data=_as_str(run_config, "eval.data"),
            batch_size=_as_int(run_config, "eval.batch-size", minimum=1),
            allow_inexact_batching=_as_bool(run_config, "eval.allow-inexact-batching"),
        ),
        tracking=_tracking(run_config),
    )


TRACKING_BACKENDS = ("tensorboard", "wandb", "mlflow", "trackio")


def _tracking(cfg: Mapping[str, Any]) -> TrackingSettings:
    raw = _as_str(cfg, "tracking.backends", allow_empty=True)
    names = tuple(n.strip() for n in raw.split(",") if n.strip())
    for name in names:
        if name not in TRACKING_BACKENDS:
            raise ConfigError(f"tracking.backends={raw!r}: {name!r} is not one of {', '.join(TRACKING_BACKENDS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"tracking.backends={raw!r}: a backend is named twice")
    return TrackingSettings(
        backends=names,
        project=_as_str(cfg, "tracking.project"),
        uri=_as_str(cfg, "tracking.uri", allow_empty=True),
        wandb_mode=_choice(cfg, "tracking.wandb-mode", ("offline", "online")),
        clients=_as_bool(cfg, "tracking.clients"),
        sweep_name=str(cfg.get("sweep.name", "") or ""),
        sweep_point=str(cfg.get("sweep.point", "") or ""),
    )


def _strategy(cfg: Mapping[str, Any]) -> StrategySettings:
    name = _choice(cfg, "strategy.name", tuple(STRATEGIES))
    params = []
    for key, kwarg in STRATEGIES[name][1].items():
        value = _as_float(cfg, f"strategy.{key}")
        if value < 0 or (key in ("beta-1", "beta-2", "server-momentum") and value >= 1):
            raise ConfigError(f"strategy.{key}={value!r}: out of range for {name}")
        params.append((kwarg, value))
    return StrategySettings(
        name=name,
        params=tuple(params),
        fraction_train=_fraction(cfg, "strategy.fraction-train", allow_zero=False),
        fraction_evaluate=_fraction(cfg, "strategy.fraction-evaluate", allow_zero=True),
        min_replies=_as_int(cfg, "strategy.min-replies", minimum=1),
        round_timeout=_round_timeout(cfg),
    )


def _round_timeout(cfg: Mapping[str, Any]) -> float | None:
    """`strategy.round-timeout`: "auto" (None) or seconds > 0."""
    key = "strategy.round-timeout"
    value = _require(cfg, key)
    if _is_auto(value):
        return None
    seconds = _as_float(cfg, key)
    if seconds <= 0:
        raise ConfigError(f"{key}={value!r}: expected \"auto\" or seconds > 0")
    return seconds


def _dp(cfg: Mapping[str, Any]) -> DPSettings:
    dp = DPSettings(
        enabled=_as_bool(cfg, "dp.enabled"),
        noise_multiplier=_as_float(cfg, "dp.noise-multiplier"),
        clipping_norm=_as_float(cfg, "dp.clipping-norm"),
    )
    if dp.enabled:
        if dp.noise_multiplier < 0:
            raise ConfigError(f"dp.noise-multiplier={dp.noise_multiplier!r}: must be >= 0")
        if dp.clipping_norm <= 0:
            raise ConfigError(f"dp.clipping-norm={dp.clipping_norm!r}: must be > 0")
        if cfg.get("comm.dtype") != "float32":
            raise ConfigError(f"dp.enabled=true needs comm.dtype='float32' (got {cfg.get('comm.dtype')!r})")
    return dp


def check_overrides(overrides: Mapping[str, Any], defaults: Mapping[str, Any]) -> Config:
    """Validate `--run-config` overrides offline, as `flwr run` and the app would; name bad keys.

    flwr refuses a key that is not in the pyproject with only "Invalid run configuration", so
    unknown keys are named here with the closest valid one.
    """
    import difflib

    for key in overrides:
        if key not in defaults:
            close = difflib.get_close_matches(key, list(defaults), n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ConfigError(f"unknown key '{key}'{hint}; valid keys are in [tool.flwr.app.config] of pyproject.toml")
    return parse_config({**defaults, **overrides})


def run_config_arg(overrides: Mapping[str, Any]) -> str:
    """`--run-config` text for these overrides (TOML values; strings single-quoted, or double-quoted if they hold ').

    flwr reads a quoted value up to the next quote of the same kind, with no escapes: a string with
    both kinds of quote (or a backslash inside double quotes) cannot be passed, and is refused here.
    """

    def fmt(key: str, v: object) -> str:
        if isinstance(v, bool):
            return str(v).lower()
        if isinstance(v, float):
            return repr(v)
        if not isinstance(v, str):
            return str(v)
        if "'" not in v:
            return f"'{v}'"
        if '"' not in v and "\\" not in v:
            return f'"{v}"'
        raise ConfigError(f"{key}={v!r}: flwr's --run-config cannot carry a value with both kinds of quotes")

    return " ".join(f"{k}={fmt(k, v)}" for k, v in overrides.items())
