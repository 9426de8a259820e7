"""One client's local SFT round (and local evaluation) as plain functions, testable without Flower."""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass

import torch
from datasets import Dataset
from transformers import AutoTokenizer, PreTrainedTokenizerBase
from trl import SFTConfig, SFTTrainer

from flowertune_llm.config import Config
from flowertune_llm.dataset import load_partition
from flowertune_llm.gguf import resolve_model_path
from flowertune_llm.models import (
    AdapterState,
    adapter_state,
    build_peft_model,
    compute_dtype,
    default_device,
    set_adapter_state,
)


@dataclass(frozen=True)
class RoundResult:
    """What a client sends back: the new adapter, its mean loss and its example count."""

    state: AdapterState
    train_loss: float
    num_examples: int


def load_tokenizer(name: str) -> PreTrainedTokenizerBase:
    """The model's tokenizer, with a pad token (pad = eos when the model has none)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(name))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def sft_config(cfg: Config, lr: float, output_dir: str, device: str) -> SFTConfig:
    """SFTConfig for one round: the user's training arguments + what the app owns."""
    args = dict(cfg.train.training_arguments)
    args.update(
        output_dir=output_dir,
        learning_rate=lr,
        max_length=cfg.train.seq_length,
        completion_only_loss=True,  # loss on the response (+ EOS) only
        gradient_checkpointing=cfg.model.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        seed=cfg.train.seed,
        use_cpu=device == "cpu",
        bf16=compute_dtype(device) == torch.bfloat16,
        save_strategy="no",
        disable_tqdm=True,
    )
    args.setdefault("report_to", "none")
    return SFTConfig(**args)


def make_trainer(
    cfg: Config,
    global_state: AdapterState,
    dataset: Dataset,
    lr: float,
    output_dir: str,
    eval_dataset: Dataset | None = None,
) -> SFTTrainer:
    """A fresh model with the global adapter loaded and a fresh SFTTrainer around it."""
    device = default_device()
    model = build_peft_model(cfg.model, device, cfg.train.seed)
    set_adapter_state(model, global_state)
    return SFTTrainer(
        model=model,
        args=sft_config(cfg, lr, output_dir, device),
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        processing_class=load_tokenizer(cfg.model.name),
    )


def train_one_round(
    cfg: Config, global_state: AdapterState, partition_id: int, num_partitions: int, lr: float
) -> RoundResult:
    """Train the global adapter on one partition for one round; return the local adapter."""
    dataset = load_partition(cfg.dataset_name, partition_id, num_partitions, cfg.train.seed)
    with tempfile.TemporaryDirectory(prefix="flowertune-train-") as tmp:
        trainer = make_trainer(cfg, global_state, dataset, lr, tmp)
        result = trainer.train()
        state = adapter_state(trainer.model)
    loss = float(result.training_loss)
    if not math.isfinite(loss):
        raise RuntimeError(f"partition {partition_id}: training loss is {loss}")
    return RoundResult(state=state, train_loss=loss, num_examples=len(dataset))


def evaluate_adapter(
    cfg: Config, global_state: AdapterState, partition_id: int, num_partitions: int
) -> tuple[float, int]:
    """Mean completion loss of the global adapter on (up to 64 rows of) one partition."""
    dataset = load_partition(cfg.dataset_name, partition_id, num_partitions, cfg.train.seed)
    dataset = dataset.select(range(min(64, len(dataset))))
    with tempfile.TemporaryDirectory(prefix="flowertune-eval-") as tmp:
        trainer = make_trainer(cfg, global_state, dataset, 0.0, tmp, eval_dataset=dataset)
        metrics = trainer.evaluate()
    return float(metrics["eval_loss"]), len(dataset)
