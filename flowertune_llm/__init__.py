"""flowertune-llm: federated LoRA/DoRA instruction tuning of SmolLM2 with Flower.

Nothing heavy here: the ML stack is imported by the modules that use it (ml_stack.py).
"""

from flowertune_llm.logs import quiet_third_party

quiet_third_party()  # before torch and friends import: their import-time notices are known noise
