"""Fault injection for tests/test_faults.py, loaded by every Python process that has this folder on PYTHONPATH.

With FLOWERTUNE_TEST_HANG_ROUND=N in a SuperNode's environment (its ClientApp processes inherit it), the first
training step of that node's round N blocks for good, inside the Trainer, while the SuperNode and its heartbeat
stay alive: a client stuck in a driver or a deadlock. A file FLOWERTUNE_TEST_HANG_MARK is written when it blocks.
Nothing happens in a process without the variable.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys
import time
from pathlib import Path

HANG_ROUND = os.environ.get("FLOWERTUNE_TEST_HANG_ROUND")


def _block_in_round(module) -> None:
    """Wrap train_one_round to note the round, and the Trainer's training_step to block in round HANG_ROUND."""
    import transformers

    current = {"round": None}
    train_one_round = module.train_one_round

    def noting_round(*args, **kwargs):
        current["round"] = kwargs.get("server_round")
        return train_one_round(*args, **kwargs)

    training_step = transformers.Trainer.training_step

    def blocking_step(self, *args, **kwargs):
        if str(current["round"]) == HANG_ROUND:
            Path(os.environ["FLOWERTUNE_TEST_HANG_MARK"]).write_text(str(os.getpid()))
            while True:
                time.sleep(3600)
        return training_step(self, *args, **kwargs)

    module.train_one_round = noting_round
    transformers.Trainer.training_step = blocking_step


class _AfterImport(importlib.abc.MetaPathFinder):
    """Run _block_in_round once flowertune_llm.train has executed (before client_app binds its names)."""

    def find_spec(self, fullname, path, target=None):
        if fullname != "flowertune_llm.train":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_then_patch(module):
            exec_module(module)
            _block_in_round(module)

        spec.loader.exec_module = exec_then_patch
        return spec


if HANG_ROUND:
    sys.meta_path.insert(0, _AfterImport())
