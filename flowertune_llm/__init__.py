"""flowertune-llm: federated LoRA/DoRA instruction tuning of SmolLM2 with Flower."""
