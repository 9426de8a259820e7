"""Weighted FedAvg, per-round LR, and the four reference communication figures."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from peft import get_peft_model, get_peft_model_state_dict
from transformers import LlamaConfig, LlamaForCausalLM

from flowertune_llm.config import LoraSettings, cosine_lr
from flowertune_llm.models import lora_config, state_to_arrays
from flowertune_llm.strategy import CommStats, FlowerTuneFedAvg


class FakeGrid:
    """Just enough of a Grid: 20 connected SuperNodes; node n holds partition n - 1."""

    def __init__(self, num_nodes: int = 20) -> None:
        self.node_ids = list(range(1, num_nodes + 1))

    def get_node_ids(self) -> list[int]:
        return self.node_ids

    def send_and_receive(self, messages, timeout: float = 0.0) -> list[Message]:
        """Answer the partition-id queries the strategy sends."""
        out = []
        for msg in messages:
            assert msg.metadata.message_type == MessageType.QUERY
            record = MetricRecord({"partition-id": msg.metadata.dst_node_id - 1, "num-partitions": 20})
            answer = Message(content=RecordDict({"partition": record}), reply_to=msg)
            out.append(answer)
        return out


@pytest.fixture(autouse=True)
def task_identity() -> Iterator[None]:
    """Flower messages need a run identity; give this process one for the test."""
    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old


def reply(to: Message, arrays: ArrayRecord, loss: float, n: int) -> Message:
    metrics = MetricRecord({"train_loss": loss, "num-examples": n})
    return Message(content=RecordDict({"arrays": arrays, "metrics": metrics}), reply_to=to)


def run_round(strategy: FlowerTuneFedAvg, rnd: int, arrays: ArrayRecord, replies_fn):
    from flwr.app import ConfigRecord

    messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid()))
    return messages, strategy.aggregate_train(rnd, [replies_fn(i, m) for i, m in enumerate(messages)])


def test_fedavg_is_weighted_by_examples_and_sends_the_round_lr() -> None:
    schedule = lambda rnd: cosine_lr(rnd, 10, 1e-3, 1e-5)  # noqa: E731
    strategy = FlowerTuneFedAvg(schedule, fraction_train=0.1, fraction_evaluate=0.0)
    glob = state_to_arrays({"w": torch.zeros(3, 2), "m": torch.ones(4)})
    locals_ = [
        ({"w": torch.full((3, 2), 1.0), "m": torch.full((4,), 2.0)}, 1.0, 10),
        ({"w": torch.full((3, 2), 5.0), "m": torch.full((4,), 6.0)}, 3.0, 30),
    ]
    messages, (agg, metrics) = run_round(
        strategy, 3, glob, lambda i, m: reply(m, state_to_arrays(locals_[i][0]), *locals_[i][1:])
    )
    assert len(messages) == 2  # 10% of 20 nodes
    assert all(m.content["config"]["lr"] == pytest.approx(schedule(3)) for m in messages)
    np.testing.assert_allclose(agg["w"].numpy(), np.full((3, 2), (10 * 1 + 30 * 5) / 40))
    np.testing.assert_allclose(agg["m"].numpy(), np.full((4,), (10 * 2 + 30 * 6) / 40))
    assert metrics["train_loss"] == pytest.approx((10 * 1.0 + 30 * 3.0) / 40)
    assert strategy.rounds[3].train_loss == pytest.approx(2.5)
    assert strategy.rounds[3].replies == 2 and strategy.rounds[3].failures == 0


def smollm2_adapter(hidden: int, inter: int, layers: int, heads: int, kv: int) -> ArrayRecord:
    """The baseline's DoRA r=8 adapter on a SmolLM2 architecture (built on the meta device)."""
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


@pytest.mark.parametrize(
    ("arch", "payload_mb", "with_keys_mb"),
    [
        ((576, 1536, 30, 9, 3), 747.07, 751.56),  # SmolLM2-135M
        ((960, 2560, 32, 15, 5), 1321.88, 1326.66),  # SmolLM2-360M
    ],
)
def test_communication_over_100_rounds_matches_the_reference(
    arch: tuple[int, ...], payload_mb: float, with_keys_mb: float
) -> None:
    adapter = smollm2_adapter(*arch)
    strategy = FlowerTuneFedAvg(lambda r: 1e-5, fraction_train=0.1, fraction_evaluate=0.0)
    for rnd in range(1, 4):  # every round moves the same bytes: 3 real rounds, then 97 more of the same
        run_round(strategy, rnd, adapter, lambda i, m: reply(m, adapter, 1.0, 10))
    first = strategy.rounds[1].comm_round
    assert strategy.rounds[2].comm_round == first == strategy.rounds[3].comm_round
    assert strategy.comm.total_payload_mb == pytest.approx(3 * first.total_payload_mb)
    total = CommStats(**{k: v + 97 * getattr(first, k) for k, v in vars(strategy.comm).items()})
    assert round(total.total_payload_mb, 2) == payload_mb
    assert round(total.total_with_keys_mb, 2) == with_keys_mb
