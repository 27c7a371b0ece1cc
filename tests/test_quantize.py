"""8-bit and 4-bit through bitsandbytes: transformers decides what a quantized model computes and how its folder
looks; both directions of loading, the CLI, atomic output and clear errors."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch

from helpers import run_cli, tiny_model, write_tokenizer
from localgpt.checkpoint import read_safetensors_header
from localgpt.errors import ModelError
from localgpt.families import load_config
from localgpt.model import Linear
from localgpt.quantize import DEFAULT_INT8_THRESHOLD, DEFAULT_SKIP, QuantizeError, parse_spec, write_quantized
from localgpt.weights import load_weights

pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

PROMPT = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 4, 17, 250]])
CPU = torch.device("cpu")
# (our flag, transformers' BitsAndBytesConfig arguments); compute float32 so the comparison is exact
# Our defaults differ from transformers' (DEFAULT_SKIP, DEFAULT_INT8_THRESHOLD); it is given the same options.
FOUR_BIT = dict(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=list(DEFAULT_SKIP[4]))
FORMATS = {
    "nf4": ("nf4", dict(FOUR_BIT, bnb_4bit_quant_type="nf4")),
    "fp4": ("fp4", dict(FOUR_BIT, bnb_4bit_quant_type="fp4")),
    # transformers cannot quantize a tied head in memory (its Linear8bitLt then has no CB): both keep lm_head here
    "int8": ("8", dict(load_in_8bit=True, llm_int8_threshold=DEFAULT_INT8_THRESHOLD,
                       llm_int8_skip_modules=["lm_head"])),
}


@pytest.fixture(scope="module")
def float_model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("float")
    tiny_model(folder, "llama-untied-mha", tokenizer=True)
    return folder


def reference(folder: Path, **bnb_args):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    return AutoModelForCausalLM.from_pretrained(folder, quantization_config=BitsAndBytesConfig(**bnb_args),
                                                dtype=torch.float32).eval()


def logits(model, ids=PROMPT) -> torch.Tensor:
    with torch.no_grad():
        if hasattr(model, "make_cache"):
            return model(ids, model.make_cache(1, 64), last_only=False)[0].float()
        return model(ids).logits[0].float()


def ours(folder: Path, flag: str | None = None, **kwargs):
    """Our model on the torch backend, where bitsandbytes' own modules multiply, as in transformers (the native
    backend's quantized products are held to bitsandbytes' dequantize-then-matmul in test_quantized_native.py)."""
    spec = parse_spec(flag, "float32", **kwargs) if flag else None
    return load_weights(folder, load_config(folder), torch.float32, CPU, quantize=spec, backend="torch")


def ours_as(folder: Path, name: str):
    """Ours with the options transformers is given for FORMATS[name]."""
    flag, bnb_args = FORMATS[name]
    return ours(folder, flag, skip=",".join(bnb_args["llm_int8_skip_modules"]))


def reload(folder: Path):
    return load_weights(folder, load_config(folder), torch.float32, CPU, backend="torch")


@pytest.mark.parametrize("variant", ["llama", "llama-untied-mha", "qwen2", "gemma", "phi3"])  # phi3: fused in the file
@pytest.mark.parametrize("name", list(FORMATS))
def test_quantize_on_load_equals_transformers(tmp_path, variant, name):
    flag, bnb_args = FORMATS[name]
    tiny_model(tmp_path, variant)
    expected = logits(reference(tmp_path, **bnb_args))
    got = ours_as(tmp_path, name)
    assert (logits(got) - expected).abs().max() < 1e-4
    assert type(got.layers[0].mlp.gate_up_proj).__name__ == ("Linear8bitLt" if flag == "8" else "Linear4bit")
    qkv_proj = got.layers[0].attn.qkv_proj  # 4-bit keeps attention in float (one of our Linear layers)
    assert type(qkv_proj).__name__ == "Linear8bitLt" if flag == "8" else isinstance(qkv_proj, Linear)


@pytest.mark.parametrize("name, double_quant", [("nf4", False), ("nf4", True), ("fp4", False), ("fp4", True),
                                                ("int8", False)])
def test_loads_checkpoints_saved_by_transformers(tmp_path, float_model, name, double_quant):
    flag, bnb_args = FORMATS[name]
    quantized = reference(float_model, **bnb_args, **({"bnb_4bit_use_double_quant": True} if double_quant else {}))
    quantized.save_pretrained(tmp_path)
    model = reload(tmp_path)
    assert model.quantization.bits == (8 if flag == "8" else 4)
    assert (logits(model) - logits(quantized)).abs().max() < 1e-4
    assert isinstance(model.lm_head, Linear)  # transformers keeps the head in full precision


@pytest.mark.parametrize("name", list(FORMATS))
def test_our_folder_loads_in_transformers_and_matches_its_own_quantization(tmp_path, float_model, name):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    flag, bnb_args = FORMATS[name]
    model = ours_as(float_model, name)
    write_quantized(model, float_model, tmp_path / "ours")
    theirs = reference(float_model, **bnb_args)
    theirs.save_pretrained(tmp_path / "theirs")

    config = json.loads((tmp_path / "ours" / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "bitsandbytes"
    assert config["load_in_8bit" if flag == "8" else "load_in_4bit"] is True
    ours_tensors, their_tensors = load_file(tmp_path / "ours" / "model.safetensors"), load_file(
        tmp_path / "theirs" / "model.safetensors")
    assert sorted(ours_tensors) == sorted(their_tensors)
    for key, value in their_tensors.items():
        if "quant_state" not in key:  # the packed JSON differs only in key order
            assert torch.equal(ours_tensors[key], value), key

    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    assert (logits(loaded) - logits(model)).abs().max() < 1e-4
    for file in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "ours" / file).exists()


@pytest.mark.parametrize("flag", ["nf4", "8"])
def test_round_trip_after_running(tmp_path, float_model, flag):
    """bitsandbytes repacks a 4-bit layer for its CPU kernel on the first forward pass where the CPU has
    AVX512-BF16; written in that layout it would reload as garbage, so it is refused and nothing is written.
    Anywhere else (8-bit, or a CPU without it) the written folder reloads to the same model."""
    import bitsandbytes.functional

    model = ours(float_model, flag)
    expected = logits(model)
    if flag != "8" and bitsandbytes.functional.has_avx512bf16():
        with pytest.raises(QuantizeError, match="repacked"):
            write_quantized(model, float_model, tmp_path / "after")
        assert not (tmp_path / "after").exists()
        return
    write_quantized(model, float_model, tmp_path / "after")
    assert (logits(reload(tmp_path / "after")) - expected).abs().max() < 1e-4


def test_gpt2_round_trip(tmp_path):
    tiny_model(tmp_path / "float", "gpt2")
    model = ours(tmp_path / "float", "nf4")
    write_quantized(model, tmp_path / "float", tmp_path / "q")  # before any forward pass (see above)
    expected = logits(model)
    again = reload(tmp_path / "q")
    assert (logits(again) - expected).abs().max() < 1e-5


def test_skip_keeps_modules_in_full_precision(tmp_path, float_model):
    model = ours(float_model, "8", skip="lm_head,down_proj,k_proj")
    assert isinstance(model.layers[0].mlp.down_proj, Linear)
    assert isinstance(model.layers[0].attn.qkv_proj, Linear)  # k is fused with q and v: all three stay
    assert type(model.layers[0].mlp.gate_up_proj).__name__ == "Linear8bitLt"
    write_quantized(model, float_model, tmp_path / "q")
    header = read_safetensors_header(tmp_path / "q" / "model.safetensors")
    assert header["model.layers.0.self_attn.q_proj.weight"].dtype == "float32"
    assert header["model.layers.0.mlp.up_proj.weight"].dtype == "int8"
    again = reload(tmp_path / "q")
    assert (logits(again) - logits(model)).abs().max() < 1e-5


def test_full_disk_and_interrupt_leave_nothing(tmp_path, float_model, monkeypatch):
    import safetensors.torch

    model = ours(float_model, "nf4")

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(ModelError, match="No space left on device"):
        write_quantized(model, float_model, tmp_path / "q")

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_quantized(model, float_model, tmp_path / "q")
    assert list(tmp_path.iterdir()) == []


def test_corrupt_quantized_checkpoint_is_a_clear_error(tmp_path, float_model):
    from safetensors.torch import load_file, save_file

    reference(float_model, **FORMATS["nf4"][1]).save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.down_proj.weight.absmax"]
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match="down_proj"):
        load_weights(tmp_path, load_config(tmp_path), torch.float32, CPU)




def test_bitsandbytes_never_fetches_hub_kernels(tmp_path):
    """Where the `kernels` package is installed, bitsandbytes' CPU backend imports it at import time on
    AVX512-BF16 CPUs to download and run compiled code from the hub; load_bitsandbytes hides it. A stand-in
    `kernels` that records being imported proves it stays unimported, whatever the CPU; and inside
    without_hub_kernels the import fails on every CPU, while outside it the package is back."""
    import subprocess
    import sys

    marker = tmp_path / "imported"
    (tmp_path / "kernels.py").write_text(f"open({str(marker)!r}, 'w').close()\ndef get_kernel(*a, **k): pass\n")
    script = ("import os, torch; from localgpt.quantize import load_bitsandbytes, without_hub_kernels\n"
              f"load_bitsandbytes(torch.device('cpu')); print('fetched' if os.path.exists({str(marker)!r}) "
              "else 'untouched')\n"
              "with without_hub_kernels():\n"
              "    try:\n        import kernels\n        print('imported')\n"
              "    except ImportError:\n        print('hidden')\n"
              "import kernels; print('back', hasattr(kernels, 'get_kernel'))\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["untouched", "hidden", "back", "True"]


def test_cli_quantize_list_show_generate(tmp_path, float_model):
    home = {"LOCALGPT_HOME": str(tmp_path / "home")}
    result = run_cli("quantize", str(float_model), "--bits", "4", env=home)
    assert result.returncode == 0, result.stderr
    target = Path(result.stdout.strip())
    assert target == tmp_path / "home" / "models" / f"{float_model.name}-q4"
    assert "4-bit nf4" in result.stderr

    again = run_cli("quantize", str(float_model), "--bits", "4", env=home)
    assert again.returncode == 1 and "already exists" in again.stderr and "--force" in again.stderr
    assert run_cli("quantize", str(float_model), "--bits", "4", "--force", env=home).returncode == 0

    listed = json.loads(run_cli("list", "--json", env=home).stdout)
    assert [m["quantization"] for m in listed] == ["4-bit nf4"]
    assert listed[0]["parameters"] == sum(p.numel() for p in ours(float_model).parameters())
    shown = run_cli("show", target.name, env=home)
    assert "4-bit nf4" in shown.stdout

    for model_args in (["-m", str(target)], ["-m", str(float_model), "--quantize", "8"]):
        result = run_cli("generate", *model_args, "hello", "-n", "5", "-t", "0", env=home)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
    refused = run_cli("generate", "-m", str(target), "-q", "8", "hi", env=home)
    assert refused.returncode == 2 and "already quantized" in refused.stderr


@pytest.mark.parametrize("args, message", [
    (["--bits", "3"], "--bits must be 8 or 4"),
    (["--type", "int4"], "--type must be nf4 or fp4"),
    (["--compute-dtype", "int8"], "--compute-dtype must be"),
])
def test_cli_bad_flags(capsys, float_model, args, message):
    from test_cli import run_in_process

    result = run_in_process(capsys, "quantize", str(float_model), *args)
    assert result.returncode == 2 and result.stderr.startswith("Error: ") and message in result.stderr


def test_without_bitsandbytes_one_clear_error(tmp_path, float_model):
    blocker = tmp_path / "block"
    (blocker / "bitsandbytes").mkdir(parents=True)
    (blocker / "bitsandbytes" / "__init__.py").write_text("raise ImportError('No module named bitsandbytes')\n")
    env = {"PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")]),
           "LOCALGPT_HOME": str(tmp_path / "home")}
    for args in (["quantize", str(float_model)], ["generate", "-m", str(float_model), "-q", "4", "hi"]):
        result = run_cli(*args, env=env)
        assert result.returncode == 1, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()]
        assert "pip install 'localgpt-cli[quant]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "home" / "models").exists() or not any((tmp_path / "home" / "models").iterdir())


def test_quantized_without_tokenizer_source_keeps_files(tmp_path):
    """A model folder's non-weight files travel with the quantized copy; weights and pickles never do."""
    tiny_model(tmp_path / "float", "llama")
    write_tokenizer(tmp_path / "float")
    (tmp_path / "float" / "pytorch_model.bin").write_bytes(b"not copied")
    model = ours(tmp_path / "float", "nf4")
    write_quantized(model, tmp_path / "float", tmp_path / "q")
    names = sorted(p.name for p in (tmp_path / "q").iterdir())
    assert "pytorch_model.bin" not in names and "tokenizer.json" in names and "model.safetensors" in names


def test_unwritable_home_is_said_before_quantizing(tmp_path, float_model):
    (tmp_path / "file").write_text("")  # LOCALGPT_HOME under a file: unwritable for every user, root included
    result = run_cli("quantize", str(float_model), "--bits", "8", env={"LOCALGPT_HOME": str(tmp_path / "file" / "h")})
    assert result.returncode == 1 and result.stderr.startswith("Error: cannot write "), result.stderr
    assert "set LOCALGPT_HOME to a folder you can write" in result.stderr and "quantizing" not in result.stderr


def test_on_the_torch_backend_a_quantized_head_multiplies_its_dequantized_weight(float_model):
    """Without the native kernels (the torch backend), bitsandbytes' CPU int8 head would halve decoding speed: the
    head becomes a float product of exactly bitsandbytes' dequantized weight; every other layer stays bitsandbytes'."""
    from localgpt.quantize import load_bitsandbytes, module_weight

    plain = load_weights(float_model, load_config(float_model), torch.float32, CPU, quantize=parse_spec("8", "float32"),
                         backend=None)
    assert plain.lm_head.localgpt_bits == 8  # the 8-bit default quantizes the head
    torch_backend = ours(float_model, "8")
    assert isinstance(torch_backend.lm_head, Linear)
    assert type(torch_backend.layers[0].mlp.gate_up_proj).__name__ == "Linear8bitLt"
    bnb = load_bitsandbytes(CPU)
    head = module_weight(plain.lm_head)
    assert torch.equal(torch_backend.lm_head.weight, bnb.functional.int8_vectorwise_dequant(head.data, head.scale))
