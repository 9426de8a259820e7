"""One client's local SFT round (and local evaluation) as plain functions, testable without Flower."""

from __future__ import annotations

import dataclasses
import functools
import gc
import math
import tempfile
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from datasets import Dataset

import flowertune_llm.ml_stack  # noqa: F401  (progress bars quiet, lazy names resolved)
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback
from peft import PeftModel
from trl import SFTConfig, SFTTrainer

from flowertune_llm.config import Config, ConfigError, ModelSettings, training_argument_key
from flowertune_llm.dataset import load_partition
from flowertune_llm.gguf import resolve_model_path
from flowertune_llm import devices, padding_free
from flowertune_llm.devices import (
    RoundMemory,
    TrainingCompute,
    apply_adapter_precision,
    compute_dtype,
    default_device,
    require_protocol_arithmetic,
    score_label_positions_only,
    single_device_config,
    training_compute,
    visible_gpu_ids,
    warn_if_several_gpus,
)
from flowertune_llm.models import AdapterState, adapter_state, build_peft_model, model_shape, set_adapter_state
from flowertune_llm.evaluate.generation import letter_token_ids
from flowertune_llm.letter_balance import ROTATION_COLUMN, ROW_COLUMN, LetterBalance
from flowertune_llm.schedule import BLOCK, epoch_orders, rotation_order, row_order
from flowertune_llm.tracking import client_reporting


@dataclass(frozen=True)
class RoundResult:
    """What a client sends back: the new adapter, its mean loss, its example count, and where it trained."""

    state: AdapterState
    train_loss: float
    num_examples: int
    rows_trained: int = 0  # distinct rows of the partition this round trained on (schedule.Coverage counts them)
    partition_rows: int = 0  # the partition's rows (= num_examples unless mcq rotations make a row 4 examples)
    device: dict[str, float] = field(default_factory=dict)  # peak memory of the round, GPU used, GPUs visible


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (pad = eos when the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@functools.lru_cache(maxsize=4)
def _cached_tokenizer(name: str) -> PreTrainedTokenizerBase:
    return load_tokenizer(name)


def round_tokenizer(name: str, optimized: bool = True) -> PreTrainedTokenizerBase:
    """The tokenizer for a training round: loaded once per process (a fresh copy costs ~0.2 s a round)."""
    return _cached_tokenizer(name) if optimized else load_tokenizer(name)


#: SFTConfig whose process trains on one device, whatever number of GPUs it sees (devices.py).
OneDeviceSFTConfig = single_device_config(SFTConfig)


def app_training_arguments(cfg: Config, lr: float, output_dir: str, device: str, bf16: bool | None = None) -> dict:
    """The SFTConfig fields the app sets on every client, over the user's (config refuses each of them by name).

    `bf16` (default: what `device` supports) lets `check_training_arguments` build a GPU client's
    arguments on a machine without one.
    """
    return dict(
        output_dir=output_dir,
        learning_rate=lr,
        max_length=cfg.train.seq_length,
        completion_only_loss=True,  # loss on the response (+ EOS) only
        gradient_checkpointing=cfg.model.checkpointing(device),
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=cfg.train.seed,
        use_cpu=device == "cpu",
        bf16=compute_dtype(device) == torch.bfloat16 if bf16 is None else bf16,
        save_strategy="no",
        disable_tqdm=True,
    )


def sft_config(
    cfg: Config, lr: float, output_dir: str, device: str, bf16: bool | None = None, run_name: str = "client"
) -> SFTConfig:
    """SFTConfig for one round: the user's training arguments + what the app owns (one device)."""
    args = dict(cfg.train.training_arguments)
    if cfg.tracking.clients:  # TRL reports to the run's trackers itself: one tracker run per client per round
        args.update(client_reporting(cfg, run_name))
    args.update(app_training_arguments(cfg, lr, output_dir, device, bf16))
    if cfg.train.dynamic_data_seed or cfg.train.rotates:  # the round's rows come pre-ordered (schedule): keep that order
        args["train_sampling_strategy"] = "sequential"
    if cfg.train.dynamic_data_seed and cfg.train.examples_per_round is None:
        # by epochs: round_examples lays out each epoch's own order (schedule.epoch_orders); read it once
        args["num_train_epochs"] = cfg.train.num_epochs / cfg.train.epoch_passes
    args.setdefault("report_to", "none")
    return OneDeviceSFTConfig(**args)


#: The SFTConfigs clients build: (device, bf16, how an error says which); a GPU client's is built without a GPU.
CLIENT_VARIANTS = (("cpu", False, ""), ("cuda", True, " (as a GPU client builds it: bf16=True)"))
#: How much of TRL's reason a one-line error keeps.
_REASON_CHARS = 240


def check_training_arguments(cfg: Config) -> None:
    """Build the SFTConfigs clients build (placeholder folder; a CPU client's and a bf16 GPU client's), so TRL's own
    checks refuse a bad argument now, in milliseconds, rather than in every ClientApp after the model loaded.

    The error names the key(s) as run-config keys, with TRL's reason cut to one readable line: a key
    that fails on its own is named alone; one that fails only beside another is named with it.
    """
    known = {f.name for f in dataclasses.fields(SFTConfig)}
    for name, _ in cfg.train.training_arguments:
        if name not in known:
            raise ConfigError(f"{training_argument_key(name)}: '{name}' is not a field of trl.SFTConfig")
    user = list(cfg.train.training_arguments)

    def failure(arguments: list[tuple[str, Any]]) -> str | None:
        trial = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, training_arguments=tuple(arguments)))
        for device, bf16, where in CLIENT_VARIANTS:
            try:
                with devices.assume_bf16_gpu(device != "cpu"):
                    sft_config(trial, cfg.train.learning_rate_max, tempfile.gettempdir(), device, bf16)
            except Exception as exc:  # noqa: BLE001 - TRL/transformers raise ValueError, TypeError, KeyError, ...
                return (" ".join(str(exc).split()) or type(exc).__name__) + where
        return None

    reason = failure(user)
    if reason is None:
        return
    culprits: list[tuple[str, Any]] = []
    for i, (name, value) in enumerate(user):
        if failure(user[: i + 1]) is None:
            continue
        alone = failure([(name, value)])
        partner = None if alone else next((p for p in user[:i] if failure([p, (name, value)])), None)
        culprits = [(name, value)] if partner is None else [partner, (name, value)]
        reason = failure(culprits) or reason
        break
    keys = " with ".join(f"{training_argument_key(n)}={v!r}" for n, v in culprits) or \
        "the training arguments the app sets (train.seq-length, model.gradient-checkpointing, ...)"
    if len(reason) > _REASON_CHARS:
        reason = reason[: _REASON_CHARS - 3].rstrip() + "..."
    raise ConfigError(f"{keys}: {reason}")


class ModelCache:
    """The process's quantized base model + adapter, rebuilt only when what defines it changes.

    `freeze_gc` (default) takes the process's long-lived objects out of the collector's view once
    the model is built; False is the plain path bench_step measures beside it.
    """

    def __init__(self, freeze_gc: bool = True) -> None:
        self._key: tuple | None = None
        self._model: PeftModel | None = None
        self.freeze_gc = freeze_gc

    def get(self, settings: ModelSettings, device: str, seed: int, dtype: torch.dtype | None = None) -> PeftModel:
        """The cached model for (model settings, device, compute dtype), building it on first use."""
        key = (settings, device, dtype or compute_dtype(device))
        if key != self._key:
            self._model = None  # free the old one before loading another
            gc.unfreeze()  # ... including its reference cycles
            gc.collect()
            self._model = build_peft_model(settings, device, seed, dtype)
            self._key = key
            if self.freeze_gc:
                # The process's long-lived objects (libraries, the model) leave the collector's view:
                # the trainer's gc.collect() at every round's start then scans only the round's own.
                gc.freeze()
        assert self._model is not None
        return self._model


class TokenizedCache:
    """Tokenized partitions (TRL's processed datasets), keyed by everything that shapes them."""

    def __init__(self) -> None:
        self._data: dict[tuple, Dataset] = {}

    def get(self, key: tuple) -> Dataset | None:
        """The processed dataset for `key`, if seen."""
        return self._data.get(key)

    def put(self, key: tuple, dataset: Dataset) -> None:
        """Remember a processed dataset."""
        self._data[key] = dataset


#: One of each per process: a simulation actor or a SuperNode's ClientApp process.
MODELS = ModelCache()
TOKENIZED = TokenizedCache()


def reset_adapter(model: PeftModel, state: AdapterState) -> None:
    """Give a (possibly reused) model exactly the state a fresh one would have, plus `state`."""
    for param in model.parameters():
        if param.requires_grad:
            param.grad = None
    apply_adapter_precision(model, default_device())  # TRL cast it to bf16 last round: as a fresh one
    set_adapter_state(model, state)


class ProximalSFTTrainer(SFTTrainer):
    """SFTTrainer whose loss adds FedProx's mu/2 * ||w - w_global||^2 over the adapter weights, and with
    `mcq_balance` > 0 the letter-balance term over each batch's complete rotation groups (letter_balance.py)."""

    def __init__(self, *args: Any, proximal_mu: float = 0.0, mcq_balance: float = 0.0,
                 compute: TrainingCompute | None = None, **kwargs: Any) -> None:
        self.proximal_mu = proximal_mu
        self.compute = compute  # the dtype the model computes in, and why (reported with the round)
        self.anchor: dict[str, torch.Tensor] = {}
        if proximal_mu > 0:  # the global adapter, before any local step
            model = kwargs["model"]
            self.anchor = {n: p.detach().float().clone() for n, p in model.named_parameters() if p.requires_grad}
        super().__init__(*args, **kwargs)
        self.balance = None
        if mcq_balance > 0:
            self.balance = LetterBalance(self.model, letter_token_ids(self.processing_class), mcq_balance)
            self.data_collator = _KeepRotation(self.data_collator)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if getattr(self, "balance", None) is not None:
            extra = [c for c in (ROTATION_COLUMN, ROW_COLUMN) if c not in self._signature_columns]
            self._signature_columns = [*self._signature_columns, *extra]

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        """The SFT loss, plus the proximal term when mu > 0 and the letter-balance term when it is on."""
        rotations, rows = inputs.pop(ROTATION_COLUMN, None), inputs.pop(ROW_COLUMN, None)
        if self.balance is None or rotations is None or not model.training:  # evaluation: the completion loss alone
            out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                       num_items_in_batch=num_items_in_batch)
        else:
            with self.balance.capture():
                out = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                           num_items_in_batch=num_items_in_batch)
            term = self.balance.term(inputs["labels"], rotations, padding_free.row_bounds(inputs), rows)
            if term is not None:
                if num_items_in_batch is not None:  # Trainer leaves accumulation to the loss: average the term over it
                    term = term / self.current_gradient_accumulation_steps
                out = (out[0] + term, out[1]) if return_outputs else out + term
        if self.proximal_mu <= 0:
            return out
        prox = sum(
            ((p.float() - self.anchor[n].to(p.device)) ** 2).sum()
            for n, p in model.named_parameters()
            if n in self.anchor
        )
        if return_outputs:
            return out[0] + 0.5 * self.proximal_mu * prox, out[1]
        return out + 0.5 * self.proximal_mu * prox


class _KeepRotation:
    """TRL's collator, plus the batch's rotation and question columns as tensors (the balance term needs them)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, Any]:
        columns = (ROTATION_COLUMN, ROW_COLUMN)
        batch = self.inner([{k: v for k, v in e.items() if k not in columns} for e in examples])
        for column in columns:
            batch[column] = torch.tensor([int(e.get(column, -1)) for e in examples])
        return batch


def make_trainer(
    cfg: Config,
    global_state: AdapterState,
    dataset: Dataset,
    lr: float,
    output_dir: str,
    eval_dataset: Dataset | None = None,
    models: ModelCache | None = None,
    callbacks: list[TrainerCallback] | None = None,
    proximal_mu: float = 0.0,
    optimized: bool = True,
    run_name: str = "client",
) -> SFTTrainer:
    """The global adapter on the (cached) model and a fresh SFTTrainer (new optimizer) around it.

    `optimized` (default) applies the step-cost policies (float32 adapter, label positions only on
    CPU, the cached tokenizer: identical training, docs/benchmarks.md); False is the plain path.
    The compute dtype (`train.cpu-compute`) and `train.padding-free` apply on either path.
    """
    device = default_device()
    warn_if_several_gpus(device)
    compute = round_compute(cfg, device)
    if models is None:
        model = build_peft_model(cfg.model, device, cfg.train.seed, compute.dtype)
        set_adapter_state(model, global_state)
    else:
        model = models.get(cfg.model, device, cfg.train.seed, compute.dtype)
        reset_adapter(model, global_state)
    padding_free.use_attention(model, cfg.train.padding_free)
    tokenizer = round_tokenizer(cfg.model.name, optimized)
    trainer = ProximalSFTTrainer(
        proximal_mu=proximal_mu,
        mcq_balance=cfg.train.mcq_balance if cfg.train.rotates else 0.0,
        compute=compute,
        model=model,
        args=sft_config(cfg, lr, output_dir, device, run_name=run_name),
        data_collator=padding_free.collator(tokenizer.pad_token_id) if cfg.train.padding_free else None,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.remove_callback(PrinterCallback)  # per-step dicts on stdout; the server logs each round
    require_protocol_arithmetic(trainer.model)
    score_label_positions_only(enabled=optimized)  # a CPU-only effect: TRL already does it where Triton runs
    if device == "cpu":
        devices.cpu_lm_head_tiles(enabled=optimized)
    if optimized:  # False only in bench_step's "plain" side: the code before these policies
        apply_adapter_precision(trainer.model, device)  # float32 master weights on every device
    return trainer


def round_compute(cfg: Config, device: str) -> TrainingCompute:
    """The dtype this process trains `cfg.model` in on `device` (`train.cpu-compute`; measured once per process)."""
    if not device.startswith("cpu"):
        return training_compute(device, cfg.train.cpu_compute, 0, 0)
    return training_compute(device, cfg.train.cpu_compute, *model_shape(cfg.model.name))


def partition_for(cfg: Config, partition_id: int, num_partitions: int) -> Dataset:
    """This run's prompt-completion rows of one partition (the template's own, cached per process)."""
    mcq = cfg.train.prompt_template == "mcq"
    return load_partition(
        cfg.dataset_name, partition_id, num_partitions, cfg.train.seed, cfg.train.prompt_template,
        cfg.train.mcq_fraction if mcq else 0.0, cfg.model.name if mcq else "", cfg.train.seq_length if mcq else 512,
        cfg.train.rotates, cfg.train.mcq_options if mcq else "random",
    )


def round_examples(cfg: Config, dataset: Dataset, server_round: int, partition_id: int) -> tuple[Dataset, int, int]:
    """The round's examples in training order, the rows they train and the partition's rows.

    With `train.dynamic-data-seed` a new order of rows each round (`schedule.row_order`); with mcq
    rotations a row's examples stay together, in blocks a batch never splits (`schedule.rotation_order`);
    otherwise (neither) the trainer's own order, one example per row.
    """
    num_examples = len(dataset)
    if cfg.train.rotates:
        rows = sorted(set(dataset["mcq_row"]))  # TRL may have dropped a row: number the rest 0..n-1
        dense = {r: i for i, r in enumerate(rows)}
        example_rows = [dense[r] for r in dataset["mcq_row"]]
        if cfg.train.dynamic_data_seed and cfg.train.examples_per_round is None:  # by epochs: each its own order
            whole = math.ceil(len(example_rows) / BLOCK) * BLOCK  # every row, the last block completed: epochs align
            orders = epoch_orders(cfg.train.seed, server_round, partition_id, len(rows), cfg.train.epoch_passes)
            indices = [i for order in orders for i in rotation_order(order, example_rows, whole)[0]]
            return dataset.select(indices), len(rows), len(rows)
        order = row_order(cfg.train.seed, server_round, partition_id, len(rows), dynamic=cfg.train.dynamic_data_seed)
        indices, taken = rotation_order(order, example_rows, cfg.train.examples_per_round)
        return dataset.select(indices), taken, len(rows)
    if cfg.train.dynamic_data_seed:
        if cfg.train.examples_per_round is None:  # by epochs: each epoch its own order (sft_config runs them once)
            order = np.concatenate(epoch_orders(cfg.train.seed, server_round, partition_id, num_examples,
                                                cfg.train.epoch_passes))
        else:
            order = row_order(cfg.train.seed, server_round, partition_id, num_examples, dynamic=True)
        dataset = dataset.select(order)
    return dataset, cfg.train.rows_per_round(num_examples), num_examples


def train_one_round(
    cfg: Config,
    global_state: AdapterState,
    partition_id: int,
    num_partitions: int,
    lr: float,
    models: ModelCache | None = MODELS,
    tokenized: TokenizedCache | None = TOKENIZED,
    callbacks: list[TrainerCallback] | None = None,
    proximal_mu: float = 0.0,
    server_round: int = 1,
    optimized: bool = True,
) -> RoundResult:
    """Train the global adapter on one partition for one round; return the local adapter.

    With `train.dynamic-data-seed` the partition's rows are trained in the round's own order
    (`schedule.row_order` of seed, round and partition); without it, in the trainer's fixed one.
    `models=None` / `tokenized=None` rebuild the model / re-tokenize (the reference behaviour).
    """
    device = default_device()
    if cfg.train.release_memory and device == "cpu":
        devices.release_memory_to_os()
    key = (cfg.dataset_name, partition_id, num_partitions, cfg.train.seed, cfg.model.name, cfg.train.seq_length,
           cfg.train.prompt_template, cfg.train.mcq_fraction, cfg.train.rotates, cfg.train.mcq_options)
    dataset = tokenized.get(key) if tokenized is not None else None
    if dataset is None:
        dataset = partition_for(cfg, partition_id, num_partitions)
    with tempfile.TemporaryDirectory(prefix="flowertune-train-") as tmp, RoundMemory(device) as memory:
        trainer = make_trainer(
            cfg, global_state, dataset, lr, tmp, models=models, callbacks=callbacks, proximal_mu=proximal_mu,
            optimized=optimized, run_name=f"{cfg.tracking.sweep_point or 'run'} round {server_round} partition {partition_id}",
        )
        if tokenized is not None:
            tokenized.put(key, trainer.train_dataset)
        num_examples = len(trainer.train_dataset)  # after TRL dropped rows with no response left
        trainer.train_dataset, rows_trained, partition_rows = round_examples(
            cfg, trainer.train_dataset, server_round, partition_id)
        result = trainer.train()
        state = adapter_state(trainer.model)
        used = {**memory.peak_mb(), "gpu": float(trainer.args.device.index or 0) if device != "cpu" else -1.0,
                "visible_gpus": float(visible_gpu_ids()), **trainer.compute.metrics(),
                "padding_free": float(cfg.train.padding_free)}
    loss = float(result.training_loss)
    if not math.isfinite(loss):
        raise RuntimeError(f"partition {partition_id}: training loss is {loss}")
    return RoundResult(state=state, train_loss=loss, num_examples=num_examples, rows_trained=rows_trained,
                       partition_rows=partition_rows, device=used)


def evaluate_adapter(
    cfg: Config, global_state: AdapterState, partition_id: int, num_partitions: int
) -> tuple[float, int]:
    """Mean completion loss of the global adapter on (up to 64 rows of) one partition."""
    dataset = partition_for(cfg, partition_id, num_partitions)
    dataset = dataset.select(range(min(64, len(dataset))))
    with tempfile.TemporaryDirectory(prefix="flowertune-eval-") as tmp:
        trainer = make_trainer(cfg, global_state, dataset, 0.0, tmp, eval_dataset=dataset, models=MODELS)
        metrics = trainer.evaluate()
    return float(metrics["eval_loss"]), len(dataset)
