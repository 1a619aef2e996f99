"""Demo LoRA experts for the bundled SmolLM2-135M-Instruct: one folder per task (PEFT files + loramux.json)."""

from pathlib import Path

BUNDLED_EXPERTS_DIR = Path(__file__).resolve().parent
