"""Flower strategies over adapter tensors: round LR, seeded sampling, reply checks, tracking."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from logging import INFO, WARNING
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
import flwr.serverapp.strategy as flwr_strategies
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAvg, Strategy

from flowertune_llm import rules
from flowertune_llm.config import STRATEGIES, DPSettings
from flowertune_llm.models import AdapterState, arrays_to_state, state_to_arrays
from flowertune_llm.schedule import Coverage, sample_round

MB = rules.MIB  # as Flower's communication tracker and the leaderboard count


def payload_bytes(arrays: ArrayRecord) -> int:
    """Serialized array payload only (what the reference baseline reports)."""
    return sum(len(array.data) for array in arrays.values())


def record_bytes(arrays: ArrayRecord) -> int:
    """Flower 1.42's `ArrayRecord.count_bytes()`: payload plus the key strings."""
    return arrays.count_bytes()


@dataclass
class CommStats:
    """Bytes of adapter arrays moved, both ways, in both accountings."""

    sent_payload: int = 0
    sent_with_keys: int = 0
    received_payload: int = 0
    received_with_keys: int = 0

    def add_sent(self, arrays: ArrayRecord, copies: int) -> None:
        """Count `copies` messages carrying `arrays` from the server."""
        self.sent_payload += copies * payload_bytes(arrays)
        self.sent_with_keys += copies * record_bytes(arrays)

    def add_received(self, arrays: ArrayRecord) -> None:
        """Count one client reply carrying `arrays`."""
        self.received_payload += payload_bytes(arrays)
        self.received_with_keys += record_bytes(arrays)

    @property
    def total_payload_mb(self) -> float:
        """Payload-only total in MB."""
        return (self.sent_payload + self.received_payload) / MB

    @property
    def total_with_keys_mb(self) -> float:
        """Total in MB counting key strings, as `ArrayRecord.count_bytes()` does."""
        return (self.sent_with_keys + self.received_with_keys) / MB


#: `strategy.round-timeout = "auto"`: the first round waits Flower's default hour (model loads, nothing measured);
#: later ones this many times the slowest round so far, never less than the floor.
ROUND_TIMEOUT_FIRST, ROUND_TIMEOUT_FACTOR, ROUND_TIMEOUT_FLOOR = 3600.0, 4.0, 600.0


class FederationError(RuntimeError):
    """The federation cannot go on (too few SuperNodes or replies for `strategy.min-replies`): one line, no traceback."""


def failures_text(rejected: list[dict[str, Any]]) -> str:
    """`2 (node 12, partition 3: no reply in 600 s; node 7, partition 6: client error: ...)`: how many, which, why."""
    if not rejected:
        return "0"
    reasons = "; ".join(f"node {r['node']}, partition {r.get('partition')}: {str(r['reason'])[:120]}" for r in rejected)
    return f"{len(rejected)} ({reasons})"


class TimedGrid:
    """A Grid whose train and evaluate rounds wait the strategy's current round timeout (Flower's `start` passes one
    value for the whole run) and which remembers where each round message went and which were never answered.

    Flower's SuperNode takes one message at a time: a node whose ClientApp hangs stays online (its heartbeat goes
    on) but pulls nothing else until that ClientApp replies. `busy_nodes` names such nodes so a round does not
    wait for them again; other messages (the partition query) keep their timeout; everything else is the Grid's.
    """

    def __init__(self, grid: Grid, timeout: Callable[[], float], poll_s: float = 3.0) -> None:
        self._grid = grid
        self._timeout = timeout
        self.poll_s = poll_s
        self._sent: dict[str, int] = {}  # message id -> destination node (round messages)
        self._unanswered: dict[int, tuple[str, float]] = {}  # node -> (message id, when sent)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float = 3600.0) -> Iterable[Message]:
        """Push, then pull replies until all came or the timeout passed (the round's, for train and evaluate)."""
        messages = list(messages)
        if not any(m.metadata.message_type in (MessageType.TRAIN, MessageType.EVALUATE) for m in messages):
            return self._grid.send_and_receive(messages, timeout=timeout)
        end, sent_at = time.monotonic() + self._timeout(), time.monotonic()
        ids = list(self._grid.push_messages(messages))
        waiting = {mid for mid in ids if mid}
        self._sent.update({mid: m.metadata.dst_node_id for mid, m in zip(ids, messages) if mid})
        replies: list[Message] = []
        while waiting:
            got = list(self._grid.pull_messages(waiting))
            replies += got
            waiting -= {r.metadata.reply_to_message_id for r in got}
            if not waiting or time.monotonic() >= end:
                break
            time.sleep(max(0.0, min(self.poll_s, end - time.monotonic())))
        self._unanswered.update({self._sent[mid]: (mid, sent_at) for mid in waiting})
        return replies

    def node_of(self, reply: Message) -> int:
        """The node a reply is about: for an error the SuperLink writes for an unreachable node, the sender is the
        SuperLink itself, so look up where the message it answers went."""
        return self._sent.get(reply.metadata.reply_to_message_id, reply.metadata.src_node_id)

    def busy_nodes(self) -> dict[int, float]:
        """Nodes still working on a round message that timed out -> seconds since it was sent (late replies are
        pulled first: a node that answered since is free again; its late reply is dropped)."""
        if self._unanswered:
            late = self._grid.pull_messages({mid for mid, _ in self._unanswered.values()})
            answered = {r.metadata.reply_to_message_id for r in late}
            self._unanswered = {n: v for n, v in self._unanswered.items() if v[0] not in answered}
        now = time.monotonic()
        return {node: now - sent for node, (_, sent) in self._unanswered.items()}

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


class _NodesView:
    """A Grid that shows the strategy's Flower base only the nodes a round may sample."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid, self._node_ids = grid, node_ids

    def get_node_ids(self) -> list[int]:
        return list(self._node_ids)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)


#: What a client reports about its device in a train reply (devices.RoundMemory, train.train_one_round).
CLIENT_DEVICE_KEYS = ("peak_mem_mb", "peak_reserved_mb", "gpu", "visible_gpus", "compute_bf16", "compute_source",
                      "bf16_matmul_speedup", "padding_free")


@dataclass
class RoundLog:
    """What the server learned in one round (one line of metrics.jsonl)."""

    server_round: int
    lr: float
    sampled_partitions: list[int | None] = field(default_factory=list)
    replies: int = 0
    failures: int = 0
    train_loss: float | None = None
    client_losses: list[dict] = field(default_factory=list)  # per client: loss, examples, rows, peak memory, GPU
    rows_new: int | None = None  # rows trained on for the first time in this run, all clients of the round
    rows_covered: int | None = None  # distinct rows trained on since round 1
    peak_mem_mb: float | None = None  # the largest client peak of the round (GPU: allocated; CPU: resident set)
    rejected: list[dict] = field(default_factory=list)
    comm_round: CommStats = field(default_factory=CommStats)
    comm_total: CommStats = field(default_factory=CommStats)
    validation: dict[str, Any] = field(default_factory=dict)  # the in-training MMLU figures, if evaluated
    timeout_s: float | None = None  # how long the round waited at most for its replies (strategy.round-timeout)
    skipped: list[dict] = field(default_factory=list)  # online nodes not sampled: still busy with an older message
    started: float = field(default_factory=time.monotonic, repr=False)
    wall_time_s: float = 0.0

    def to_record(self) -> dict:
        """The JSON line: MB figures instead of raw byte counters."""
        rec = {k: v for k, v in asdict(self).items() if k not in ("comm_round", "comm_total", "started", "validation")}
        rec["mb_sent"] = self.comm_round.sent_payload / MB
        rec["mb_received"] = self.comm_round.received_payload / MB
        rec["mb_round"] = self.comm_round.total_payload_mb
        rec["mb_round_with_keys"] = self.comm_round.total_with_keys_mb
        rec["mb_sent_total"] = self.comm_total.sent_payload / MB
        rec["mb_received_total"] = self.comm_total.received_payload / MB
        rec["mb_total"] = self.comm_total.total_payload_mb
        rec["mb_total_with_keys"] = self.comm_total.total_with_keys_mb
        rec["comm_total_bytes"] = asdict(self.comm_total)
        rec.update(self.validation)
        return rec


def check_reply(
    msg: Message, state: AdapterState, expected: dict[str, tuple[tuple[int, ...], str]], key: str, weight_key: str
) -> str | None:
    """Why a client's reply (its arrays decoded to `state`) cannot be aggregated; None if it can."""
    wire = msg.content.array_records[key]
    missing, extra = sorted(set(expected) - set(wire)), sorted(set(wire) - set(expected))
    if missing or extra:
        return f"tensor names differ (missing {missing[:2]}, unexpected {extra[:2]})"
    for name, array in wire.items():
        shape, dtype = expected[name]
        if tuple(array.shape) != shape or array.dtype != dtype:
            return f"{name}: shape {tuple(array.shape)} dtype {array.dtype}, expected {shape} {dtype}"
    metrics = next(iter(msg.content.metric_records.values()), None)
    count = None if metrics is None else metrics.get(weight_key)
    if isinstance(count, bool) or not isinstance(count, (int, float)) or not count > 0:
        return f"'{weight_key}' is {count!r}, expected a positive number"
    for name, tensor in state.items():
        if not bool(torch.isfinite(tensor).all()):
            return f"{name}: non-finite values"
    return None


class FlowerTuneMixin:
    """Adds to a Flower strategy: round LR, seeded resumable sampling, wire dtype, reply checks,
    communication and loss tracking. Put it before the Flower strategy in the bases."""

    def __init__(
        self,
        lr_schedule: Callable[[int], float],
        fraction_train: float,
        fraction_evaluate: float,
        seed: int = 0,
        partitions: dict[int, int] | None = None,
        round_offset: int = 0,
        comm: CommStats | None = None,
        wire_dtype: str = "float32",
        min_replies: int = 1,
        comm_budget_mb: float = rules.COMM_BUDGET_MB,
        coverage: Coverage | None = None,
        round_timeout: float | None = None,
        **strategy_kwargs: Any,
    ) -> None:
        super().__init__(  # type: ignore[call-arg]
            fraction_train=fraction_train, fraction_evaluate=fraction_evaluate, **strategy_kwargs
        )
        self.lr_schedule = lr_schedule
        self.seed = seed
        self.partitions = partitions or {}
        self.round_offset = round_offset
        self.comm = comm or CommStats()
        self.wire_dtype = wire_dtype
        self.min_replies = min_replies
        self.comm_budget_mb = comm_budget_mb
        self.coverage = coverage or Coverage(seed, dynamic=False)
        self.rounds: dict[int, RoundLog] = {}
        self.round_timeout_setting = round_timeout
        self._sampled: list[int] = []
        self._grid: Grid | None = None  # the grid of the current round (a TimedGrid in the app)
        self._expected: dict[str, tuple[tuple[int, ...], str]] = {}
        self._budget_warned = self.comm.total_with_keys_mb > comm_budget_mb

    def round_timeout(self) -> float:
        """Seconds the next round waits for its replies: `strategy.round-timeout`, or "auto": Flower's hour for a
        process's first round (model loads, nothing measured yet), then `ROUND_TIMEOUT_FACTOR` x the slowest round
        so far, never under `ROUND_TIMEOUT_FLOOR`. A client that hangs costs at most that, its round goes on with
        the replies it has."""
        if self.round_timeout_setting is not None:
            return self.round_timeout_setting
        times = [r.wall_time_s for r in self.rounds.values() if r.wall_time_s > 0]
        if not times:
            return ROUND_TIMEOUT_FIRST
        return max(ROUND_TIMEOUT_FLOOR, ROUND_TIMEOUT_FACTOR * max(times))

    @property
    def peak_mem_mb(self) -> float | None:
        """The largest client peak memory of this process's rounds (None where no client reported one)."""
        peaks = [r.peak_mem_mb for r in self.rounds.values() if r.peak_mem_mb is not None]
        return max(peaks) if peaks else None

    def available_nodes(self, rnd: int, grid: Grid) -> tuple[list[int], list[dict]]:
        """The online nodes that can take round `rnd`, and those skipped (still busy with a message that timed out):
        waits up to the round timeout for `strategy.min-replies` free nodes, then stops the run in one line."""
        busy_nodes = getattr(grid, "busy_nodes", dict)
        deadline, waited = time.monotonic() + self.round_timeout(), False
        while True:
            online, busy = list(grid.get_node_ids()), busy_nodes()
            free = [n for n in online if n not in busy]
            if len(free) >= self.min_replies:
                break
            if time.monotonic() >= deadline:
                raise FederationError(
                    f"round {rnd}: {len(free)} SuperNode(s) can take the round ({len(online)} online, "
                    f"{len([n for n in online if n in busy])} still busy with an unanswered message), fewer than "
                    f"strategy.min-replies={self.min_replies} after waiting {self.round_timeout():.0f} s "
                    "(strategy.round-timeout)"
                )
            if not waited:
                log(WARNING, "round %d: %d SuperNode(s) can take the round, strategy.min-replies=%d: waiting up to "
                    "%.0f s for more", rnd, len(free), self.min_replies, self.round_timeout())
                waited = True
            time.sleep(getattr(grid, "poll_s", 3.0))
        skipped = []
        for node in (n for n in online if n in busy):
            log(WARNING, "round %d: node %d (partition %s) has not answered a message sent %.0f s ago (its ClientApp "
                "hangs: a SuperNode takes one message at a time): not sampled", rnd, node, self.partitions.get(node),
                busy[node])
            skipped.append({"node": node, "partition": self.partitions.get(node),
                            "reason": f"no reply yet to a message sent {busy[node]:.0f} s ago"})
        return free, skipped

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """The strategy's own train config, then seeded sampling, LR and wire dtype on top."""
        rnd = server_round + self.round_offset
        config["lr"] = self.lr_schedule(rnd)
        self._grid = grid
        free, skipped = self.available_nodes(rnd, grid)
        wanted = (self.min_train_nodes, self.min_available_nodes)  # type: ignore[has-type]
        # Flower's base waits, without a limit, for min_train_nodes: never more than can take the round
        self.min_train_nodes, self.min_available_nodes = (min(w, len(free)) for w in wanted)
        try:
            messages = list(super().configure_train(server_round, arrays, config, _NodesView(grid, free)))  # type: ignore[misc]
        finally:
            self.min_train_nodes, self.min_available_nodes = wanted
        if not messages:
            return []
        config = messages[0].content[self.configrecord_key]
        config["server-round"] = rnd
        unknown = [n for n in free if n not in self.partitions]
        if unknown:  # first round, or nodes that joined since: ask for their partition ids
            self.partitions.update(discover_partitions(grid, unknown))
        node_ids = sample_round(free, self.partitions, len(messages), self.seed, rnd)
        partitions = [self.partitions.get(n) for n in node_ids]
        log(INFO, "round %d: sampled partitions %s (%d of %d nodes)", rnd, partitions, len(node_ids), len(free))
        wire = state_to_arrays(arrays_to_state(arrays), self.wire_dtype)
        self._expected = {k: (tuple(a.shape), a.dtype) for k, a in wire.items()}
        record = RecordDict({self.arrayrecord_key: wire, self.configrecord_key: config})
        messages = list(self._construct_messages(record, node_ids, MessageType.TRAIN))  # type: ignore[attr-defined]
        round_log = RoundLog(rnd, float(config["lr"]), partitions, timeout_s=self.round_timeout(),
                             skipped=skipped)
        self._sampled = list(node_ids)
        round_log.comm_round.add_sent(wire, copies=len(messages))
        self.comm.add_sent(wire, copies=len(messages))
        self.rounds[rnd] = round_log
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Drop bad replies (logged with node and reason), name the sampled nodes that sent none, aggregate, record."""
        round_log = self.rounds[server_round + self.round_offset]
        replies = list(replies)
        good = []
        node_of = getattr(self._grid, "node_of", lambda m: m.metadata.src_node_id)
        for msg in replies:
            node = node_of(msg)
            if msg.has_error():
                reason = f"client error: {msg.error.reason}"
            elif self.arrayrecord_key not in msg.content.array_records:
                reason = f"no ArrayRecord '{self.arrayrecord_key}'"
            else:
                wire = msg.content.array_records[self.arrayrecord_key]
                round_log.comm_round.add_received(wire)
                self.comm.add_received(wire)
                state = arrays_to_state(wire)
                reason = check_reply(msg, state, self._expected, self.arrayrecord_key, self.weighted_by_key)  # type: ignore[attr-defined]
            if reason is not None:
                round_log.rejected.append({"node": node, "partition": self.partitions.get(node), "reason": reason})
                log(WARNING, "round %d: dropped the reply of node %d (partition %s): %s",
                    round_log.server_round, node, self.partitions.get(node), reason)
                continue
            msg.content[self.arrayrecord_key] = state_to_arrays(state)
            metrics = next(iter(msg.content.metric_records.values()))
            client = {
                "node": node,
                "partition": self.partitions.get(node),
                "loss": float(metrics.get("train_loss", float("nan"))),
                "examples": int(metrics[self.weighted_by_key]),  # type: ignore[attr-defined]
                **{k: float(metrics[k]) for k in CLIENT_DEVICE_KEYS if k in metrics},
            }
            if "rows-trained" in metrics and client["partition"] is not None:
                client["rows_trained"] = int(metrics["rows-trained"])
                if "partition-rows" in metrics:  # with mcq rotations a row is several examples
                    client["rows"] = int(metrics["partition-rows"])
                client["rows_new"] = self.coverage.add(
                    round_log.server_round, client["partition"], client.get("rows", client["examples"]),
                    client["rows_trained"],
                )
            round_log.client_losses.append(client)
            good.append(msg)
        replied = {node_of(msg) for msg in replies}
        for node in (n for n in self._sampled if n not in replied):  # sampled, no reply before the timeout
            reason = f"no reply in {round_log.timeout_s:.0f} s"
            round_log.rejected.append({"node": node, "partition": self.partitions.get(node), "reason": reason})
            log(WARNING, "round %d: node %d (partition %s): %s (strategy.round-timeout); the round goes on without it",
                round_log.server_round, node, self.partitions.get(node), reason)
        peaks = [c["peak_mem_mb"] for c in round_log.client_losses if "peak_mem_mb" in c]
        round_log.peak_mem_mb = max(peaks) if peaks else None
        new = [c["rows_new"] for c in round_log.client_losses if "rows_new" in c]
        round_log.rows_new = sum(new) if new else None
        round_log.rows_covered = self.coverage.total if new else None
        round_log.replies = len(good)
        round_log.failures = len(round_log.rejected)
        round_log.comm_total = CommStats(**asdict(self.comm))
        if len(good) < self.min_replies:
            raise FederationError(
                f"round {round_log.server_round}: {len(good)} usable replies, fewer than "
                f"strategy.min-replies={self.min_replies}; failed={failures_text(round_log.rejected)}"
            )
        arrays, metrics = super().aggregate_train(server_round, good)  # type: ignore[misc]
        if metrics is not None and "train_loss" in metrics:
            round_log.train_loss = float(metrics["train_loss"])
        round_log.wall_time_s = time.monotonic() - round_log.started
        if not self._budget_warned and self.comm.total_with_keys_mb > self.comm_budget_mb:
            self._budget_warned = True
            log(WARNING, "Cumulative communication %.2f MiB exceeds the leaderboard budget of %.0f MB (MiB)",
                self.comm.total_with_keys_mb, self.comm_budget_mb)
        return arrays, metrics


class FlowerTuneFedAvg(FlowerTuneMixin, FedAvg):
    """FedAvg (weighted by examples) with this app's round handling."""


def build_strategy(name: str, **kwargs: Any) -> FlowerTuneMixin:
    """The named Flower strategy with this app's round handling (kwargs: mixin + strategy's own)."""
    base: type[Strategy] = getattr(flwr_strategies, STRATEGIES[name][0])
    cls = FlowerTuneFedAvg if base is FedAvg else type(f"FlowerTune{base.__name__}", (FlowerTuneMixin, base), {})
    return cls(**kwargs)


def discover_partitions(grid: Grid, node_ids: list[int], timeout: float = 120.0) -> dict[int, int]:
    """Ask nodes for their partition id (a tiny QUERY message each)."""
    messages = [
        Message(content=RecordDict(), message_type=MessageType.QUERY, dst_node_id=node_id)
        for node_id in node_ids
    ]
    partitions = {}
    for reply in grid.send_and_receive(messages, timeout=timeout):
        if not reply.has_error() and "partition" in reply.content.metric_records:
            partitions[reply.metadata.src_node_id] = int(reply.content["partition"]["partition-id"])
    return partitions


def with_dp(strategy: FlowerTuneMixin, dp: DPSettings, num_nodes: int) -> Strategy:
    """Wrap in Flower's central DP (client-side fixed clipping) when `dp.enabled`."""
    if not dp.enabled:
        return strategy  # type: ignore[return-value]
    sampled = max(int(num_nodes * strategy.fraction_train), strategy.min_train_nodes)  # type: ignore[attr-defined]
    return DifferentialPrivacyClientSideFixedClipping(
        strategy, dp.noise_multiplier, dp.clipping_norm, num_sampled_clients=sampled  # type: ignore[arg-type]
    )
