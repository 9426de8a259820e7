"""alpaca-gpt4 (hub id or local file/folder) -> IID partitions -> prompt/completion rows (see prompts.py)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache, partial
from pathlib import Path

from datasets import Dataset

from flowertune_llm.config import ConfigError
from flowertune_llm.hub import require_hub_or_cache
from flowertune_llm.prompts import mcq_examples, to_prompt_completion

REQUIRED_COLUMNS = ("instruction", "input", "output")
DATASET_KEY = "static.dataset.name"
_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}

@dataclass(frozen=True)
class DatasetSource:
    """Where `datasets.load_dataset` finds the data: a hub id, or a builder plus local files."""

    path: str
    data_files: tuple[str, ...] = ()

    @property
    def is_local(self) -> bool:
        """True for local files/folders."""
        return bool(self.data_files)

    def load_kwargs(self) -> dict[str, object]:
        """Keyword arguments for `datasets.load_dataset` / `FederatedDataset`."""
        if self.data_files:
            return {"dataset": self.path, "data_files": list(self.data_files)}
        return {"dataset": self.path}


def _looks_local(name: str) -> bool:
    return (
        name.startswith((".", "/", "~"))
        or Path(name).suffix.lower() in _BUILDERS
        or Path(name).expanduser().exists()
    )


def resolve_source(name: str) -> DatasetSource:
    """Map `static.dataset.name` to a source; a local path that does not exist is an error."""
    if not _looks_local(name):
        return DatasetSource(path=name)
    path = Path(name).expanduser().resolve()
    if not path.exists():
        raise ConfigError(f"{DATASET_KEY}={name!r}: local path {path} does not exist")
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    files = [p for p in files if p.suffix.lower() in _BUILDERS]
    builders = {_BUILDERS[p.suffix.lower()] for p in files}
    if not files:
        raise ConfigError(
            f"{DATASET_KEY}={name!r}: no .json/.jsonl/.parquet/.csv file found at {path}"
        )
    if len(builders) > 1:
        raise ConfigError(f"{DATASET_KEY}={name!r}: mixed file formats {sorted(builders)}")
    return DatasetSource(path=builders.pop(), data_files=tuple(str(p) for p in files))


@lru_cache(maxsize=4)
def federated_dataset(name: str, num_partitions: int, seed: int):  # -> FederatedDataset
    """The partitioned dataset, built once per process per (name, partitions, seed)."""
    from flwr_datasets import FederatedDataset
    from flwr_datasets.partitioner import IidPartitioner

    source = resolve_source(name)
    return FederatedDataset(
        partitioners={"train": IidPartitioner(num_partitions=num_partitions)},
        shuffle=True,
        seed=seed,
        **source.load_kwargs(),
    )


def check_columns(dataset: Dataset, name: str) -> None:
    """Refuse a dataset that lacks alpaca's columns, naming the missing ones."""
    missing = [c for c in REQUIRED_COLUMNS if c not in dataset.column_names]
    if missing:
        raise ConfigError(
            f"{DATASET_KEY}={name!r}: missing required column(s) {missing}; "
            f"found {dataset.column_names}"
        )


def validate_dataset(name: str) -> int:
    """Load the train split once, check its columns; return its row count."""
    from datasets import load_dataset

    source = resolve_source(name)
    if not source.is_local:
        require_hub_or_cache(DATASET_KEY, name, "dataset")
    kwargs = source.load_kwargs()
    path = kwargs.pop("dataset")
    try:
        dataset = load_dataset(path, split="train", **kwargs)
    except Exception as exc:  # network, unknown id, missing split, unreadable file
        raise ConfigError(f"{DATASET_KEY}={name!r}: could not load the dataset: {exc}") from exc
    check_columns(dataset, name)
    return dataset.num_rows


@lru_cache(maxsize=8)
def load_partition(
    name: str, partition_id: int, num_partitions: int, seed: int, template: str = "alpaca",
    mcq_fraction: float = 0.0, tokenizer_name: str = "", seq_length: int = 512, mcq_rotations: bool = False,
    mcq_options: str = "random",
) -> Dataset:
    """One client's IID share in prompt-completion form for a prompt template (cached per process).

    ``mcq`` also needs the share of multiple-choice rows, the tokenizer and sequence length the
    examples must fit, whether questions come in their four rotations and where options come
    from (`prompts.mcq_examples`).
    """
    partition = federated_dataset(name, num_partitions, seed).load_partition(partition_id, "train")
    check_columns(partition, name)
    if template != "mcq":
        return partition.map(partial(to_prompt_completion, template=template), remove_columns=partition.column_names)
    if not tokenizer_name:
        raise ValueError("the mcq template needs the model's tokenizer to fit train.seq-length")
    fits, shorten = token_budget(tokenizer_name, seq_length)
    rows = partition.select_columns(list(REQUIRED_COLUMNS)).to_list()
    return Dataset.from_list(mcq_examples(rows, seed, partition_id, mcq_fraction, fits, shorten,
                                          rotate=mcq_rotations, options=mcq_options))


def token_budget(tokenizer_name: str, seq_length: int):  # -> (fits, shorten)
    """Whether a prompt + completion (+ the end token TRL adds) fits `seq_length` tokens, and a token-wise cut."""
    from transformers import AutoTokenizer

    from flowertune_llm.gguf import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(tokenizer_name))

    def fits(prompt: str, completion: str) -> bool:
        return len(tokenizer(prompt + completion).input_ids) + 1 <= seq_length

    def shorten(text: str, tokens: int) -> str:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return text if len(ids) <= tokens else tokenizer.decode(ids[:tokens]).rstrip() + " ..."

    return fits, shorten
