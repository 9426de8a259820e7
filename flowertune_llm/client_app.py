"""ClientApp: Message -> Config -> train_one_round(...) -> Message."""

from __future__ import annotations

import os

import flowertune_llm.ml_stack  # noqa: F401  first: Flower imports both apps at once (see ml_stack.py)
from flwr.app import Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.clientapp.mod import fixedclipping_mod
from flwr.clientapp.typing import ClientAppCallable
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from flowertune_llm.config import parse_config
from flowertune_llm.devices import set_process_threads
from flowertune_llm.models import arrays_to_state, state_to_arrays
from flowertune_llm.train import evaluate_adapter, train_one_round

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

def dp_clipping_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Flower's fixed-clipping mod, applied only to train messages of runs with DP enabled."""
    config = msg.content.config_records.get("config")
    if msg.metadata.message_type == MessageType.TRAIN and config and KEY_CLIPPING_NORM in config:
        return fixedclipping_mod(msg, context, call_next)
    return call_next(msg, context)


app = ClientApp(mods=[dp_clipping_mod])


def _partition(context: Context) -> tuple[int, int]:
    return int(context.node_config["partition-id"]), int(context.node_config["num-partitions"])


@app.train()
def train(msg: Message, context: Context) -> Message:
    """Train the received global adapter on this node's partition for one round."""
    cfg = parse_config(context.run_config)
    set_process_threads()
    partition_id, num_partitions = _partition(context)
    result = train_one_round(
        cfg,
        arrays_to_state(msg.content["arrays"]),
        partition_id,
        num_partitions,
        lr=float(msg.content["config"]["lr"]),
        proximal_mu=float(msg.content["config"].get("proximal-mu", 0.0)),
        server_round=int(msg.content["config"]["server-round"]),
    )
    metrics = MetricRecord({"train_loss": result.train_loss, "num-examples": result.num_examples,
                            "rows-trained": result.rows_trained, "partition-rows": result.partition_rows,
                            **result.device})
    arrays = state_to_arrays(result.state, cfg.comm.dtype)
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    """Completion loss of the global adapter on a slice of this node's partition."""
    cfg = parse_config(context.run_config)
    set_process_threads()
    partition_id, num_partitions = _partition(context)
    loss, n = evaluate_adapter(cfg, arrays_to_state(msg.content["arrays"]), partition_id, num_partitions)
    metrics = MetricRecord({"eval_loss": loss, "num-examples": n})
    return Message(content=RecordDict({"metrics": metrics}), reply_to=msg)


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Tell the server this node's partition id (for reproducible, resumable sampling)."""
    partition_id, num_partitions = _partition(context)
    record = MetricRecord({"partition-id": partition_id, "num-partitions": num_partitions})
    return Message(content=RecordDict({"partition": record}), reply_to=msg)
