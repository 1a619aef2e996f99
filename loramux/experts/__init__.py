"""Demo LoRA experts for the bundled SmolLM2-135M-Instruct: one folder per task (PEFT files + loramux.json),
and composites/ with the MoLE, MoR and MoRE composites trained over the same nine tasks."""

from pathlib import Path

BUNDLED_EXPERTS_DIR = Path(__file__).resolve().parent
BUNDLED_COMPOSITES_DIR = BUNDLED_EXPERTS_DIR / "composites"
