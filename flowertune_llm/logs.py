"""What the app's processes print: known third-party notices silenced, expected errors in one line."""

from __future__ import annotations

import logging
import os
import re
import warnings

#: Warnings raised by libraries we import that tell the user nothing they can act on
#: (category, start of the message). Anything else still shows.
KNOWN_WARNINGS: tuple[tuple[type[Warning], str], ...] = (
    (DeprecationWarning, r"`torch\.jit\.script"),  # torch's own modules, at import
    # ray.init: Ray's future default. Filtered, never answered by setting RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO,
    # which Ray's workers inherit: a ClientApp given 0 GPUs would then see every GPU (devices.py)
    (FutureWarning, r"Tip: In future versions of Ray"),
    # transformers 5.24 renames gradient -> activation checkpointing; PEFT and TRL still call the old names
    (FutureWarning, r"`(is_)?gradient_checkpointing(_enable|_kwargs)?` is deprecated"),
)

#: Log records about optional extras, or Flower's placeholders for features the app does not use
#: ({logger: regexes searched in the message}).
KNOWN_LOG_NOTICES: dict[str, tuple[str, ...]] = {
    # CPUs with AVX512-BF16: bnb tries to fetch an optional kernel from the hub; the built-in one runs.
    "bitsandbytes.backends.cpu.ops": (r"^Failed to load CPU gemm_4bit_forward from kernels-community",),
    "flwr": (
        r"^fraction_evaluate is set to 0\.0",  # the app's default: no federated evaluation, on purpose
        r"^Manually terminating ClientAppActor",  # every simulated client, after the run's last line
        r"\(empty!\)$",  # the per-round train config is built per round (the LR), not up front
        r"^Initial global evaluation results: None$",  # the app logs its own round-0 evaluation
        r"└──> MetricRecord: None$",
        r"^\s*Aggregated ClientApp-side Evaluate Metrics:$",
        r"^\s*\{\}$",
    ),
}


class _DropNotice(logging.Filter):
    def __init__(self, patterns: tuple[str, ...]) -> None:
        super().__init__()
        self.patterns = [re.compile(p) for p in patterns]

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(p.search(message) for p in self.patterns)


def quiet_third_party() -> None:
    """Silence the known notices above in this process (idempotent; other warnings still show)."""
    for category, message in KNOWN_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name, prefixes in KNOWN_LOG_NOTICES.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNotice) for f in logger.filters):
            logger.addFilter(_DropNotice(prefixes))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # progress bars of weight loading and dataset preparation: in a streamed run log each redraw is a line
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def quiet_progress_bars() -> None:
    """The same for libraries imported before `quiet_third_party` set the environment."""
    import datasets
    import transformers

    transformers.utils.logging.disable_progress_bar()
    datasets.disable_progress_bars()


class OneLineErrors(logging.Filter):
    """On Flower's logger: an expected error (bad config, bad path) logs as its message, no traceback.

    Flower logs an exception escaping the ServerApp with its traceback and then an exit-code
    block; for an error the user made, the message (which names the key and value) is all that
    helps. The run still ends as failed (`flwr ls` shows `finished:failed`), as for any exception.
    """

    def __init__(self, expected: tuple[type[BaseException], ...]) -> None:
        super().__init__()
        self.expected = expected
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, self.expected):
            record.msg, record.args = "Run stopped: %s", (str(exc),)
            record.exc_info, record.exc_text = None, None
            self.seen = True
        elif self.seen and isinstance(record.msg, str) and record.msg.startswith("Exit Code:"):
            record.msg, record.args = record.msg.split("\n", 1)[0] + " (run failed; see the line above)", ()
        return True


def one_line_errors(expected: tuple[type[BaseException], ...]) -> None:
    """Install `OneLineErrors` on Flower's logger once per process."""
    logger = logging.getLogger("flwr")
    if not any(isinstance(f, OneLineErrors) for f in logger.filters):
        logger.addFilter(OneLineErrors(expected))
