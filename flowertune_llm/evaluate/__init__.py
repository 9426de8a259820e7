"""Built-in FlowerTune General-NLP evaluation (MMLU), exact protocol, batched."""
