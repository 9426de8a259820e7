"""Each strategy against a hand computation on real replies; defended aggregation; FedProx; DP."""

from __future__ import annotations

import time

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, MessageType, RecordDict
from flwr.supercore.differential_privacy import KEY_CLIPPING_NORM

from flowertune_llm.client_app import dp_clipping_mod
from flowertune_llm.config import DPSettings, cosine_lr, parse_config
from flowertune_llm.models import arrays_to_state, initial_adapter, state_to_arrays
from flowertune_llm.strategy import CommStats, FlowerTuneFedAvg, build_strategy, with_dp
from flowertune_llm.train import ModelCache, TokenizedCache, train_one_round
from tests.helpers import FakeGrid, RoundGrid, reply, smollm2_adapter, tiny_run_config

pytestmark = pytest.mark.usefixtures("task_identity")  # Flower messages need a run identity

PARTITIONS = {n: n - 1 for n in range(1, 21)}  # FakeGrid's node ids 1..20
PARAMS = {
    "fedavg": {},
    "fedprox": {"proximal_mu": 0.5},
    "fedavgm": {"server_learning_rate": 1.0, "server_momentum": 0.9},
    "fedadam": {"eta": 1e-2, "eta_l": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedyogi": {"eta": 1e-2, "eta_l": 1e-2, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-3},
    "fedadagrad": {"eta": 1e-2, "eta_l": 1e-2, "tau": 1e-3},
}


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir: Path):
    cfg = parse_config(tiny_run_config(tiny_llama_dir, **{
        "model.quantization": "none", "train.training-arguments.max-steps": 1,
    }))
    start, _ = initial_adapter(cfg.model, cfg.train.seed)
    return cfg, start, ModelCache(), TokenizedCache()


def weighted_mean(states: list[dict], weights: list[int]) -> dict[str, np.ndarray]:
    total = sum(weights)
    return {k: sum(w * s[k].numpy() for s, w in zip(states, weights)) / total for k in states[0]}


class Hand:
    """The strategies' server updates, written out from their papers/definitions."""

    def __init__(self, name: str, params: dict) -> None:
        self.name, self.p = name, params
        self.m: dict | None = None
        self.v: dict | None = None

    def step(self, x: dict[str, np.ndarray], avg: dict[str, np.ndarray], rnd: int) -> dict[str, np.ndarray]:
        p = self.p
        if self.name in ("fedavg", "fedprox"):
            return avg
        if self.name == "fedavgm":
            pg = {k: x[k] - avg[k] for k in x}
            self.m = pg if self.m is None else {k: p["server_momentum"] * self.m[k] + pg[k] for k in x}
            return {k: x[k] - p["server_learning_rate"] * self.m[k] for k in x}
        delta = {k: avg[k] - x[k] for k in x}
        b1 = p.get("beta_1", 0.0)
        m_prev = self.m or {k: np.zeros_like(v) for k, v in x.items()}
        self.m = {k: b1 * m_prev[k] + (1 - b1) * delta[k] for k in x}
        v_prev = self.v or {k: np.zeros_like(v) for k, v in x.items()}
        if self.name == "fedadam":
            self.v = {k: p["beta_2"] * v_prev[k] + (1 - p["beta_2"]) * delta[k] ** 2 for k in x}
            eta = p["eta"] * np.sqrt(1 - p["beta_2"] ** (rnd + 1)) / (1 - b1 ** (rnd + 1))
        elif self.name == "fedyogi":
            self.v = {k: v_prev[k] - (1 - p["beta_2"]) * delta[k] ** 2 * np.sign(v_prev[k] - delta[k] ** 2) for k in x}
            eta = p["eta"]
        else:  # fedadagrad
            self.v = {k: v_prev[k] + delta[k] ** 2 for k in x}
            eta = p["eta"]
        return {k: x[k] + eta * self.m[k] / (np.sqrt(self.v[k]) + p["tau"]) for k in x}


@pytest.mark.parametrize("name", list(PARAMS))
def test_two_rounds_match_a_hand_computation(name: str, tiny) -> None:
    cfg, start, models, tokenized = tiny
    strategy = build_strategy(name, lr_schedule=lambda r: 5e-3, fraction_train=0.1, fraction_evaluate=0.0,
                              seed=1, partitions=PARTITIONS, **PARAMS[name])
    hand = Hand(name, PARAMS[name])
    arrays, x = state_to_arrays(start), {k: v.numpy() for k, v in start.items()}
    for rnd in (1, 2):
        messages = list(strategy.configure_train(rnd, arrays, ConfigRecord(), FakeGrid()))
        assert len(messages) == 2
        config = messages[0].content["config"]
        assert config["lr"] == 5e-3 and config.get("proximal-mu", 0.0) == PARAMS[name].get("proximal_mu", 0.0)
        results = [
            train_one_round(cfg, arrays_to_state(m.content["arrays"]), PARTITIONS[m.metadata.dst_node_id], 20,
                            float(config["lr"]), models, tokenized, proximal_mu=float(config.get("proximal-mu", 0.0)))
            for m in messages
        ]
        replies = [reply(m, state_to_arrays(r.state), r.train_loss, r.num_examples) for m, r in zip(messages, results)]
        agg, metrics = strategy.aggregate_train(rnd, replies)
        x = hand.step(x, weighted_mean([r.state for r in results], [r.num_examples for r in results]), rnd)
        got = arrays_to_state(agg)
        for k in x:
            np.testing.assert_allclose(got[k].numpy(), x[k], rtol=1e-4, atol=1e-6, err_msg=f"{name} round {rnd} {k}")
        assert strategy.rounds[rnd].replies == 2 and metrics["train_loss"] > 0
        arrays = agg
    assert any(not np.allclose(x[k], start[k].numpy()) for k in x)


def test_proximal_term_pulls_the_update_towards_the_global_adapter(tiny) -> None:
    cfg, start, models, tokenized = tiny
    cfg3 = parse_config({**tiny_run_config(Path(cfg.model.name)), "model.quantization": "none",
                         "train.training-arguments.max-steps": 4})

    def distance(mu: float) -> float:
        state = train_one_round(cfg3, start, 0, 20, 1e-2, models, tokenized, proximal_mu=mu).state
        return sum(((state[k] - start[k]) ** 2).sum().item() for k in start) ** 0.5

    free, pulled = distance(0.0), distance(50.0)
    assert pulled < 0.9 * free


def bad_replies(messages: list[Message], good: dict[str, torch.Tensor]) -> dict[str, Message]:
    """One bad reply of each kind, built on the first sampled node's message."""
    msg = messages[0]
    first = next(iter(good))
    nan = {**good, first: torch.full_like(good[first], float("nan"))}
    shape = {**good, first: torch.zeros(3, 3)}
    missing = {k: v for k, v in good.items() if k != first}
    return {
        "non-finite values": reply(msg, state_to_arrays(nan), 1.0, 10),
        "shape": reply(msg, state_to_arrays(shape), 1.0, 10),
        "tensor names differ": reply(msg, state_to_arrays(missing), 1.0, 10),
        "'num-examples' is 0": reply(msg, state_to_arrays(good), 1.0, 0),
        "client error: CUDA out of memory": Message(Error(code=0, reason="CUDA out of memory"), reply_to=msg),
    }


@pytest.mark.parametrize("kind", [
    "non-finite values", "shape", "tensor names differ", "'num-examples' is 0", "client error: CUDA out of memory"])
def test_a_bad_reply_is_dropped_and_named_and_the_round_goes_on(
    kind: str, tiny, caplog: pytest.LogCaptureFixture
) -> None:
    _, start, _, _ = tiny
    strategy = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=0.15, fraction_evaluate=0.0,
                              seed=0, partitions=PARTITIONS)
    messages = list(strategy.configure_train(1, state_to_arrays(start), ConfigRecord(), FakeGrid()))
    assert len(messages) == 3
    goods = [{k: v + 0.1 * (i + 1) for k, v in start.items()} for i in range(3)]
    replies = [bad_replies(messages, goods[0])[kind]] + [
        reply(m, state_to_arrays(g), 1.0, 10 * (i + 2)) for i, (m, g) in enumerate(zip(messages[1:], goods[1:]))
    ]
    caplog.set_level(logging.WARNING, logger="flwr")
    agg, _ = strategy.aggregate_train(1, replies)
    expected = weighted_mean(goods[1:], [20, 30])
    for k in expected:
        np.testing.assert_allclose(arrays_to_state(agg)[k].numpy(), expected[k], rtol=1e-6)
    node = messages[0].metadata.dst_node_id
    assert any(f"node {node}" in r.getMessage() and kind in r.getMessage() for r in caplog.records), caplog.text
    assert strategy.rounds[1].replies == 2 and strategy.rounds[1].failures == 1
    assert strategy.rounds[1].rejected[0]["partition"] == PARTITIONS[node]


def test_too_few_usable_replies_fail_the_round_clearly(tiny) -> None:
    _, start, _, _ = tiny
    strategy = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=0.1, fraction_evaluate=0.0,
                              min_replies=2, partitions=PARTITIONS)
    messages = list(strategy.configure_train(1, state_to_arrays(start), ConfigRecord(), FakeGrid()))
    replies = [Message(Error(code=0, reason="boom"), reply_to=messages[0]), reply(messages[1], state_to_arrays(start), 1.0, 5)]
    with pytest.raises(RuntimeError, match="1 usable replies, fewer than strategy.min-replies=2"):
        strategy.aggregate_train(1, replies)


def test_dp_clips_every_update_and_adds_noise_of_the_configured_std(tiny) -> None:
    _, start, _, _ = tiny
    clip, noise = 0.5, 0.8
    inner = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=0.1, fraction_evaluate=0.0,
                           partitions=PARTITIONS)
    dp = with_dp(inner, DPSettings(True, noise, clip), num_nodes=20)
    messages = list(dp.configure_train(1, state_to_arrays(start), ConfigRecord(), FakeGrid()))
    assert messages[0].content["config"][KEY_CLIPPING_NORM] == clip

    # Client side: the mod clips whatever the local training returns.
    clipped = []
    for i, msg in enumerate(messages):
        far = {k: v + (i + 1) * 3.0 for k, v in start.items()}
        out = dp_clipping_mod(msg, Context(1, msg.metadata.dst_node_id, {}, RecordDict(), {}),
                              lambda m, c, far=far: reply(m, state_to_arrays(far), 1.0, 10))
        update = {k: v - start[k] for k, v in arrays_to_state(out.content["arrays"]).items()}
        norm = sum((u ** 2).sum().item() for u in update.values()) ** 0.5
        assert norm <= clip * (1 + 1e-5)
        clipped.append(out)
    plain = weighted_mean([arrays_to_state(m.content["arrays"]) for m in clipped], [10, 10])

    # Server side: noise std = noise_multiplier * clip / sampled clients, over many draws.
    draws = []
    for rnd in range(2, 42):
        msgs = list(dp.configure_train(rnd, state_to_arrays(start), ConfigRecord(), FakeGrid()))
        fresh = [reply(m, c.content["arrays"], 1.0, 10) for m, c in zip(msgs, clipped)]
        agg, _ = dp.aggregate_train(rnd, fresh)
        got = arrays_to_state(agg)
        draws.append(np.concatenate([(got[k].numpy() - plain[k]).ravel() for k in plain]))
    noise_values = np.concatenate(draws)
    expected_std = noise * clip / 2
    assert abs(noise_values.std() / expected_std - 1) < 0.02
    assert abs(noise_values.mean()) < 0.01 * expected_std * 10


def test_train_messages_without_dp_pass_through_the_mod(tiny) -> None:
    _, start, _, _ = tiny
    strategy = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=0.1, fraction_evaluate=0.0)
    msg = list(strategy.configure_train(1, state_to_arrays(start), ConfigRecord(), FakeGrid()))[0]
    far = {k: v + 3.0 for k, v in start.items()}
    out = dp_clipping_mod(msg, Context(1, 1, {}, RecordDict(), {}), lambda m, c: reply(m, state_to_arrays(far), 1.0, 1))
    assert torch.equal(arrays_to_state(out.content["arrays"])[next(iter(far))], far[next(iter(far))])
    assert msg.metadata.message_type == MessageType.TRAIN
    assert isinstance(out.content["arrays"], ArrayRecord)


# --- FedAvg weighting, the round LR, the reference communication figures ---------------------------------


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


def test_a_sampled_node_without_a_reply_is_named_and_the_round_aggregates_the_others(tiny) -> None:
    """A client that hangs: the grid returns at the round timeout without its reply; the round aggregates the two
    replies it has, records the missing node with its partition and the timeout, and the log line names it."""
    from flowertune_llm.strategy import failures_text

    _, start, _, _ = tiny
    strategy = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=0.15, fraction_evaluate=0.0,
                              partitions=PARTITIONS, round_timeout=42.0)
    messages = list(strategy.configure_train(1, state_to_arrays(start), ConfigRecord(), FakeGrid()))
    goods = [{k: v + 0.1 * (i + 1) for k, v in start.items()} for i in range(3)]
    replies = [reply(m, state_to_arrays(g), 1.0, 10) for m, g in zip(messages[1:], goods[1:])]  # the first hangs
    agg, _ = strategy.aggregate_train(1, replies)
    expected = weighted_mean(goods[1:], [10, 10])
    for k in expected:
        np.testing.assert_allclose(arrays_to_state(agg)[k].numpy(), expected[k], rtol=1e-6)
    round_log = strategy.rounds[1]
    node = messages[0].metadata.dst_node_id
    assert (round_log.replies, round_log.failures, round_log.timeout_s) == (2, 1, 42.0)
    assert round_log.rejected == [{"node": node, "partition": PARTITIONS[node], "reason": "no reply in 42 s"}]
    assert failures_text(round_log.rejected) == f"1 (node {node}, partition {PARTITIONS[node]}: no reply in 42 s)"


def test_the_auto_round_timeout_is_an_hour_first_then_follows_the_slowest_round_with_a_floor() -> None:
    from flowertune_llm.strategy import ROUND_TIMEOUT_FACTOR, ROUND_TIMEOUT_FIRST, ROUND_TIMEOUT_FLOOR, RoundLog

    strategy = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=0.1, fraction_evaluate=0.0)
    assert strategy.round_timeout() == ROUND_TIMEOUT_FIRST
    strategy.rounds[1] = RoundLog(1, 1e-3, wall_time_s=30.0)  # a GPU round: a minute or less
    assert strategy.round_timeout() == ROUND_TIMEOUT_FLOOR
    strategy.rounds[2] = RoundLog(2, 1e-3, wall_time_s=400.0)  # a slow CPU round
    assert strategy.round_timeout() == ROUND_TIMEOUT_FACTOR * 400.0
    fixed = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=0.1, fraction_evaluate=0.0,
                           round_timeout=90.0)
    fixed.rounds[1] = RoundLog(1, 1e-3, wall_time_s=400.0)
    assert fixed.round_timeout() == 90.0


def test_the_timed_grid_waits_the_round_timeout_for_rounds_and_the_given_one_for_queries() -> None:
    from flwr.app import Message, RecordDict

    from flowertune_llm.strategy import TimedGrid

    seen: list[float] = []

    class Recording(FakeGrid):
        def send_and_receive(self, messages, timeout: float = 0.0) -> list:  # noqa: ANN001
            seen.append(timeout)
            return []

    grid = TimedGrid(Recording(), lambda: 600.0)
    query = Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=1)
    grid.send_and_receive([query], timeout=120)
    assert seen == [120] and grid.get_node_ids() == list(range(1, 21))

    rounds = TimedGrid(RoundGrid(lambda m: Message(RecordDict(), reply_to=m)), lambda: 0.5, poll_s=0.05)
    rounds.silent.add(3)
    started = time.monotonic()
    answers = rounds.send_and_receive(
        [Message(content=RecordDict(), message_type=MessageType.TRAIN, dst_node_id=n) for n in (2, 3)], timeout=3600)
    assert 0.5 <= time.monotonic() - started < 2.0  # the round's timeout, not the hour Flower's start passes
    assert [rounds.node_of(a) for a in answers] == [2] and list(rounds.busy_nodes()) == [3]
    rounds.silent.clear()  # the late reply arrives: the node is free again
    assert rounds.busy_nodes() == {}


def test_a_hanging_node_costs_its_round_only_and_a_lost_node_is_named_not_the_superlink(tiny) -> None:
    """Flower's SuperNode takes one message at a time: a node whose ClientApp hangs is not sampled again while its
    message is unanswered (no second timeout), and comes back once it replies. A node lost mid-round is answered for
    by the SuperLink (sender node 1): the failure names the node the message went to, with its partition."""
    from flowertune_llm.strategy import TimedGrid, failures_text

    _, start, _, _ = tiny
    strategy = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=1.0, fraction_evaluate=0.0,
                              partitions={n: n - 1 for n in (1, 2, 3, 4)}, round_timeout=0.3)
    fake = RoundGrid(lambda m: reply(m, m.content["arrays"], 1.0, 10), num_nodes=4)
    grid = TimedGrid(fake, strategy.round_timeout, poll_s=0.02)

    def run(rnd: int) -> list[int]:
        messages = list(strategy.configure_train(rnd, state_to_arrays(start), ConfigRecord(), grid))
        strategy.aggregate_train(rnd, grid.send_and_receive(messages, timeout=3600))
        return sorted(m.metadata.dst_node_id for m in messages)

    fake.silent, fake.gone = {2}, {3}
    assert run(1) == [1, 2, 3, 4]
    first = strategy.rounds[1]
    assert (first.replies, first.failures) == (2, 2)
    assert failures_text(first.rejected) == (
        "2 (node 3, partition 2: client error: Node Unavailable; node 2, partition 1: no reply in 0 s)")
    fake.node_ids = [1, 2, 4]  # Flower's heartbeat has marked node 3 offline
    assert run(2) == [1, 4]  # node 2 still hangs: not sampled, so the round does not wait for it
    assert strategy.rounds[2].failures == 0 and [s["node"] for s in strategy.rounds[2].skipped] == [2]
    fake.silent = set()  # node 2's ClientApp answered (late): sampled again
    assert run(3) == [1, 2, 4] and strategy.rounds[3].skipped == []


def test_too_few_nodes_for_min_replies_waits_the_round_timeout_then_fails_in_one_line(tiny) -> None:
    """Flower's base strategy would wait without a limit for `min_train_nodes`; the round waits its timeout."""
    from flowertune_llm.strategy import FederationError, TimedGrid

    _, start, _, _ = tiny
    strategy = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=1.0, fraction_evaluate=0.0,
                              partitions={1: 0, 2: 1}, round_timeout=0.3, min_replies=2)
    fake = RoundGrid(lambda m: reply(m, m.content["arrays"], 1.0, 10), num_nodes=1)
    started = time.monotonic()
    with pytest.raises(FederationError, match=r"^round 4: 1 SuperNode\(s\) can take the round \(1 online, 0 still busy "
                       r"with an unanswered message\), fewer than strategy.min-replies=2 after waiting 0 s"):
        strategy.configure_train(4, state_to_arrays(start), ConfigRecord(), TimedGrid(fake, strategy.round_timeout,
                                                                                      poll_s=0.05))
    assert 0.3 <= time.monotonic() - started < 2.0
    one = build_strategy("fedavg", lr_schedule=lambda r: 1e-3, fraction_train=0.1, fraction_evaluate=0.0,
                         partitions={1: 0})
    assert len(list(one.configure_train(1, state_to_arrays(start), ConfigRecord(), fake))) == 1  # no endless wait
    with pytest.raises(FederationError, match="1 usable replies, fewer than strategy.min-replies=2; failed=1 "
                       r"\(node 2, partition 1: no reply in 0 s\)"):
        two = RoundGrid(lambda m: reply(m, m.content["arrays"], 1.0, 10), num_nodes=2)
        two.silent.add(2)
        grid = TimedGrid(two, strategy.round_timeout, poll_s=0.02)
        messages = strategy.configure_train(5, state_to_arrays(start), ConfigRecord(), grid)
        strategy.aggregate_train(5, grid.send_and_receive(messages))


@pytest.mark.parametrize(("value", "expected"), [("auto", None), (600, 600.0), ("900", 900.0)])
def test_round_timeout_key(value: object, expected: float | None) -> None:
    from tests.helpers import default_run_config

    assert parse_config(default_run_config(**{"strategy.round-timeout": value})).strategy.round_timeout == expected
    with pytest.raises(Exception, match="strategy.round-timeout=0"):
        parse_config(default_run_config(**{"strategy.round-timeout": 0}))
