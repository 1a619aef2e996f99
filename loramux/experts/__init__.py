"""Demo LoRA experts for the bundled SmolLM2-135M-Instruct: one folder per task (PEFT files + loramux.json),
and composites/ with the MoLE, MoR and MoRE composites trained over the same nine tasks."""

import json
from pathlib import Path

BUNDLED_EXPERTS_DIR = Path(__file__).resolve().parent
BUNDLED_COMPOSITES_DIR = BUNDLED_EXPERTS_DIR / "composites"


def bundled_composite_needs() -> tuple[int, int]:
    """(gated composites, members of the largest) that the bundled composites take from the server's limits."""
    gated, members = 0, 0
    for config in BUNDLED_COMPOSITES_DIR.glob("*/loramux_composite.json"):
        spec = json.loads(config.read_text())
        if spec["type"] in ("mole", "mor"):
            gated += 1
            members = max(members, len(spec.get("members", ())), spec.get("num_experts", 0))
    return gated, members
