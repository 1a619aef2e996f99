"""loramux: one frozen base model, many LoRA experts, batched together."""

__version__ = "0.1.0"
