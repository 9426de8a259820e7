"""FedAvg over adapter tensors, with per-round LR, communication tracking and loss logging."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

MB = 1024**2  # as Flower's communication tracker counts
#: The FlowerTune leaderboard's communication budget for a whole run, in MB.
COMM_BUDGET_MB = 200_000.0


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


@dataclass
class RoundLog:
    """What the server learned in one round."""

    server_round: int
    lr: float
    replies: int = 0
    failures: int = 0
    train_loss: float | None = None
    comm_round: CommStats = field(default_factory=CommStats)
    comm_total: CommStats = field(default_factory=CommStats)


class FlowerTuneFedAvg(FedAvg):
    """FedAvg weighted by examples that sends each round's LR and tracks communication."""

    def __init__(
        self,
        lr_schedule: Callable[[int], float],
        fraction_train: float,
        fraction_evaluate: float,
        comm_budget_mb: float = COMM_BUDGET_MB,
    ) -> None:
        super().__init__(fraction_train=fraction_train, fraction_evaluate=fraction_evaluate)
        self.lr_schedule = lr_schedule
        self.comm_budget_mb = comm_budget_mb
        self.comm = CommStats()
        self.rounds: dict[int, RoundLog] = {}
        self._budget_warned = False

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        """Sample clients, attach this round's LR, and count the bytes sent."""
        lr = self.lr_schedule(server_round)
        config["lr"] = lr
        messages = list(super().configure_train(server_round, arrays, config, grid))
        round_log = RoundLog(server_round=server_round, lr=lr)
        round_log.comm_round.add_sent(arrays, copies=len(messages))
        self.comm.add_sent(arrays, copies=len(messages))
        self.rounds[server_round] = round_log
        return messages

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Weighted FedAvg of the replies; log loss and communication for the round."""
        replies = list(replies)
        round_log = self.rounds[server_round]
        for msg in replies:
            if not msg.has_error() and self.arrayrecord_key in msg.content.array_records:
                arrays = msg.content.array_records[self.arrayrecord_key]
                round_log.comm_round.add_received(arrays)
                self.comm.add_received(arrays)
        round_log.replies = sum(not m.has_error() for m in replies)
        round_log.failures = len(replies) - round_log.replies
        round_log.comm_total = CommStats(**vars(self.comm))
        arrays, metrics = super().aggregate_train(server_round, replies)
        if metrics is not None and "train_loss" in metrics:
            round_log.train_loss = float(metrics["train_loss"])
        self._log_round(round_log)
        return arrays, metrics

    def _log_round(self, r: RoundLog) -> None:
        loss = "n/a" if r.train_loss is None else f"{r.train_loss:.4f}"
        log(
            INFO,
            "[round %d] lr=%.3g clients=%d failed=%d train_loss=%s | comm this round "
            "%.2f MB (%.2f MB with keys), cumulative %.2f MB (%.2f MB with keys)",
            r.server_round,
            r.lr,
            r.replies,
            r.failures,
            loss,
            r.comm_round.total_payload_mb,
            r.comm_round.total_with_keys_mb,
            r.comm_total.total_payload_mb,
            r.comm_total.total_with_keys_mb,
        )
        if not self._budget_warned and self.comm.total_with_keys_mb > self.comm_budget_mb:
            self._budget_warned = True
            log(
                WARNING,
                "Cumulative communication %.2f MB exceeds the leaderboard budget of %.0f MB",
                self.comm.total_with_keys_mb,
                self.comm_budget_mb,
            )
