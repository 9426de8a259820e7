"""flowertune-llm: federated LoRA/DoRA instruction tuning of SmolLM2 with Flower."""

from flowertune_llm.logs import quiet_third_party

quiet_third_party()  # before torch and friends import: their import-time notices are known noise

# Flower's simulation runtime imports the ServerApp and the ClientApp from two threads at
# once. transformers and TRL resolve their names lazily, and two threads resolving the same
# lazy module race ("cannot import name 'SFTConfig' from 'trl'"). Resolving them here, under
# this package's import lock, serialises that work.
import transformers  # noqa: E402, F401  (isort: skip)
from peft import PeftModel  # noqa: E402, F401
from trl import SFTConfig, SFTTrainer  # noqa: E402, F401

from flowertune_llm.logs import quiet_progress_bars  # noqa: E402

quiet_progress_bars()
