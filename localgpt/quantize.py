"""8-bit and 4-bit linear layers through bitsandbytes, in transformers' checkpoint format.

Each quantized layer of ours, including the fused q/k/v and gate/up layers, runs as one bitsandbytes module
(Linear8bitLt or Linear4bit). Checkpoints keep transformers' per-projection names (q_proj, k_proj, ...), so a
fused layer is written as row slices and assembled from them on load. Slicing is exact: 8-bit keeps one scale
per row, 4-bit one `absmax` per block of 64 consecutive values, and a projection's rows always hold a whole
number of blocks (checked).

On CPU bitsandbytes dequantizes inside every product; the native backend replaces these modules with products
that read the same stored tensors (backends/native.py, kernels.c), so there quantized models decode faster than
float32 (docs/quantization.md has the figures).
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from localgpt.errors import LocalGPTError, ModelError, UsageError
from localgpt.paths import PICKLE_SUFFIXES
from localgpt.settings import check_quantize_choice

BLOCKSIZE = 64  # bitsandbytes' 4-bit block on CPU and CUDA; transformers writes the same
# Defaults chosen by perplexity on SmolLM2-135M (docs/quantization.md). transformers' own defaults are lm_head only
# and threshold 6.0: there 8-bit lost 3.8% and nf4 26%. 8-bit quantizes everything, the head included (for a tied
# head, a quantized copy of the embedding): with the native products' float activations that costs +0.3%, and the
# head is the largest matrix a small model reads per token. 8-bit on bitsandbytes' own products (CUDA, the torch
# backend) sends input columns above the threshold through float16; 1.5 catches this model's large activations.
# Keeping the attention q/k/v projections (one fused layer, 15% of the linear weights) and the head in the compute
# dtype halves nf4's loss (+13%; quantizing the head too doubles it again) — the trade llama.cpp's Q4_K_M makes by
# keeping attn_v and the output at higher precision.
DEFAULT_SKIP = {8: (), 4: ("lm_head", "q_proj", "k_proj", "v_proj", "qkv_proj")}  # qkv_proj: Phi-3's
DEFAULT_INT8_THRESHOLD = 1.5
INSTALL_HINT = "pip install 'localgpt-cli[quant]'"
# Checkpoint tensor names that carry a quantized weight's statistics, by the suffix after the weight's module.
FOUR_BIT_STATS = ("absmax", "quant_map", "nested_absmax", "nested_quant_map")
STAT_PREFIX = "quant_state.bitsandbytes__"


class QuantizeError(LocalGPTError):
    """bitsandbytes missing or unable to run here, or a quantized checkpoint we cannot assemble."""


@dataclass(frozen=True)
class QuantSpec:
    """What to quantize and how; to_config() is transformers' `quantization_config` for it."""

    bits: int  # 8 or 4
    quant_type: str = "nf4"  # 4-bit code: nf4 | fp4
    compute_dtype: torch.dtype = torch.bfloat16  # also the dtype of every layer left unquantized
    skip: tuple[str, ...] = ("lm_head",)  # checkpoint module names kept in full precision
    threshold: float = 6.0  # 8-bit outlier threshold (transformers' llm_int8_threshold), see DEFAULT_INT8_THRESHOLD

    @property
    def label(self) -> str:
        return "8-bit" if self.bits == 8 else f"4-bit {self.quant_type}"

    @property
    def suffix(self) -> str:
        """Folder-name suffix: -q8, -q4 (nf4), -q4-fp4."""
        if self.bits == 8:
            return "q8"
        return "q4" if self.quant_type == "nf4" else "q4-fp4"

    def to_config(self) -> dict:
        dtype = str(self.compute_dtype).removeprefix("torch.")
        return {
            "quant_method": "bitsandbytes",
            "load_in_8bit": self.bits == 8,
            "load_in_4bit": self.bits == 4,
            "bnb_4bit_quant_type": self.quant_type if self.bits == 4 else "fp4",
            "bnb_4bit_compute_dtype": dtype,
            "bnb_4bit_use_double_quant": False,
            "bnb_4bit_quant_storage": "uint8",
            "llm_int8_threshold": self.threshold,
            "llm_int8_skip_modules": list(self.skip),
            "llm_int8_has_fp16_weight": False,
            "llm_int8_enable_fp32_cpu_offload": False,
        }


def default_compute_dtype(bits: int, device: torch.device) -> torch.dtype:
    """bfloat16 on CUDA. On CPU the faster one as measured here: 8-bit float32 (bitsandbytes' bfloat16 int8 path is
    ~3.5x slower), 4-bit bfloat16 (~2.3x faster than float32) — docs/quantization.md."""
    if device.type == "cpu" and bits == 8:
        return torch.float32
    return torch.bfloat16


def parse_spec(value: str, compute_dtype: str | None = None, skip: str | None = None,
               device: torch.device | None = None, threshold: float = DEFAULT_INT8_THRESHOLD,
               quantize_head: bool = False) -> QuantSpec:
    """--quantize / --bits + --type values → QuantSpec (UsageError on bad values); quantize_head drops lm_head from
    the modules kept (given or default)."""
    value = check_quantize_choice(value)
    bits = 8 if value == "8" else 4
    quant_type = value if value in ("nf4", "fp4") else "nf4"
    if compute_dtype in (None, "auto"):
        dtype = default_compute_dtype(bits, device or torch.device("cpu"))
    elif compute_dtype in ("bfloat16", "float32", "float16"):
        dtype = getattr(torch, compute_dtype)
    else:
        raise UsageError(f"--compute-dtype must be auto, bfloat16, float32 or float16, not {compute_dtype!r}")
    names = DEFAULT_SKIP[bits] if skip is None else tuple(s.strip() for s in skip.split(",") if s.strip())
    if quantize_head:
        names = tuple(name for name in names if name != "lm_head")
    if not threshold >= 0:
        raise UsageError(f"--int8-threshold must be >= 0, not {threshold}")
    return QuantSpec(bits=bits, quant_type=quant_type, compute_dtype=dtype, skip=names, threshold=threshold)


def spec_from_config(raw: dict, source: str) -> QuantSpec | None:
    """A config.json's quantization_config → QuantSpec; None for an unquantized model."""
    q = raw.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ModelError(f"{source}: 'quantization_config' must be an object")
    method = q.get("quant_method")
    if method != "bitsandbytes":
        raise ModelError(f"{source}: quantization '{method}' is not supported — localgpt loads bitsandbytes "
                         "8-bit and 4-bit checkpoints")
    four = bool(q.get("load_in_4bit", q.get("_load_in_4bit")))
    eight = bool(q.get("load_in_8bit", q.get("_load_in_8bit")))
    if four == eight:
        raise ModelError(f"{source}: quantization_config must set exactly one of load_in_4bit and load_in_8bit")
    quant_type = q.get("bnb_4bit_quant_type", "fp4") if four else "nf4"
    if quant_type not in ("nf4", "fp4"):
        raise ModelError(f"{source}: bnb_4bit_quant_type '{quant_type}' is not supported (nf4 or fp4)")
    dtype_name = q.get("bnb_4bit_compute_dtype") if four else (raw.get("dtype") or raw.get("torch_dtype"))
    dtype = getattr(torch, str(dtype_name or "float32"), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ModelError(f"{source}: compute dtype {dtype_name!r} is not a floating-point dtype")
    threshold = q.get("llm_int8_threshold", 6.0)
    skip = q.get("llm_int8_skip_modules")
    skip = ("lm_head",) if skip is None else tuple(skip)
    return QuantSpec(bits=4 if four else 8, quant_type=quant_type, compute_dtype=dtype, skip=skip,
                     threshold=float(threshold))


@contextlib.contextmanager
def without_hub_kernels():
    """Hide the `kernels` package while bitsandbytes imports: where it is installed (transformers 5 requires it),
    bitsandbytes' CPU backend fetches compiled code from the Hugging Face hub at import on AVX512-BF16 CPUs
    (kernels-community/quantization-bitsandbytes) and runs it. We never run remote code; without the package
    bitsandbytes keeps its own CPU kernels, and ours replace them anyway."""
    missing = object()
    saved = sys.modules.get("kernels", missing)
    sys.modules["kernels"] = None  # `from kernels import ...` now raises ImportError, which bitsandbytes expects
    try:
        yield
    finally:
        if saved is missing:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = saved


def load_bitsandbytes(device: torch.device):
    """Import bitsandbytes quietly and check it runs on `device`: one clear error instead of an ImportError or a
    kernel failure halfway through a model."""
    # It warns at import about an optional `kernels` package, and 8-bit logs on every call: keep errors only.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), without_hub_kernels():
            warnings.simplefilter("ignore")
            import bitsandbytes
            import bitsandbytes.functional
    except ImportError:
        raise QuantizeError(
            f"8-bit and 4-bit models need bitsandbytes, which is not installed — {INSTALL_HINT}"
        ) from None
    except Exception as exc:  # a broken native library raises anything from OSError to RuntimeError
        raise QuantizeError(f"bitsandbytes is installed but failed to load ({exc}) — reinstall it: "
                            f"{INSTALL_HINT}") from None
    try:
        probe = torch.ones(BLOCKSIZE, 2, device=device)
        bitsandbytes.functional.quantize_4bit(probe, blocksize=BLOCKSIZE)
        bitsandbytes.functional.int8_vectorwise_quant(probe.half())
    except Exception as exc:
        hint = "use --device cpu" if device.type != "cpu" else "upgrade it (bitsandbytes >= 0.49 runs on CPU)"
        version = bitsandbytes.__version__
        raise QuantizeError(f"bitsandbytes {version} cannot run on {device} ({exc}) — {hint}") from None
    return bitsandbytes


# --- one quantized weight: quantize, slice, join, and convert to and from checkpoint tensors ----------------------

@dataclass
class QuantizedWeight:
    """An (out, in) weight in bitsandbytes' storage. 8-bit: data int8 (out, in), scale = SCB float32 (out,).
    4-bit: data uint8 (out*in/2, 1) packed pairs, scale = absmax float32 (out*in/64,), code = the 16-value map."""

    bits: int
    shape: tuple[int, int]
    data: torch.Tensor
    scale: torch.Tensor
    code: torch.Tensor | None = None
    quant_type: str | None = None
    dtype: torch.dtype = torch.float32  # what a 4-bit weight dequantizes to

    def rows(self, start: int, count: int) -> QuantizedWeight:
        out_features, in_features = self.shape
        if self.bits == 8:
            return QuantizedWeight(8, (count, in_features), self.data[start : start + count],
                                   self.scale[start : start + count])
        first, last = start * in_features, (start + count) * in_features
        if first % BLOCKSIZE or last % BLOCKSIZE:
            raise QuantizeError(f"rows {start}..{start + count} of a 4-bit weight with {in_features} inputs do not "
                                f"align with its {BLOCKSIZE}-value blocks — this layer cannot be split")
        return QuantizedWeight(4, (count, in_features), self.data[first // 2 : last // 2],
                               self.scale[first // BLOCKSIZE : last // BLOCKSIZE], self.code, self.quant_type,
                               self.dtype)

    @staticmethod
    def join(parts: list[QuantizedWeight]) -> QuantizedWeight:
        first = parts[0]
        if len(parts) == 1:
            return first
        shape = (sum(p.shape[0] for p in parts), first.shape[1])
        data = torch.cat([p.data for p in parts])
        scale = torch.cat([p.scale for p in parts])
        return QuantizedWeight(first.bits, shape, data, scale, first.code, first.quant_type, first.dtype)

    def dequantize(self, bnb, dtype: torch.dtype) -> torch.Tensor:
        """The (out, in) weight in `dtype`, as bitsandbytes dequantizes it."""
        if self.bits == 8:
            return bnb.functional.int8_vectorwise_dequant(self.data, self.scale).to(dtype)
        state = bnb.functional.QuantState(absmax=self.scale, shape=torch.Size(self.shape), code=self.code,
                                          blocksize=BLOCKSIZE, quant_type=self.quant_type, dtype=torch.float32)
        return bnb.functional.dequantize_4bit(self.data, state).to(dtype)

    def checkpoint_tensors(self, weight_key: str, bnb) -> dict[str, torch.Tensor]:
        """transformers' names: 4-bit `W`, `W.absmax`, `W.quant_map`, `W.quant_state.bitsandbytes__nf4`;
        8-bit `W` (int8), `M.SCB`, `M.weight_format` where W = M.weight."""
        if self.bits == 8:
            module = weight_key.removesuffix(".weight")
            return {weight_key: self.data.contiguous(), f"{module}.SCB": self.scale.contiguous(),
                    f"{module}.weight_format": torch.tensor(0, dtype=torch.uint8)}
        state = bnb.functional.QuantState(absmax=self.scale.contiguous(), shape=torch.Size(self.shape),
                                          code=self.code, blocksize=BLOCKSIZE, quant_type=self.quant_type,
                                          dtype=self.dtype)
        tensors = {weight_key: self.data.contiguous()}
        for name, value in state.as_dict(packed=True).items():
            tensors[f"{weight_key}.{name}"] = value.contiguous()
        return tensors

    @staticmethod
    def from_checkpoint(tensors: dict[str, torch.Tensor], key: str, bnb) -> QuantizedWeight:
        """The tensors of one weight by suffix ('weight', 'SCB', 'absmax', 'quant_state.bitsandbytes__nf4', ...)."""
        data = tensors.get("weight")
        if data is None:
            raise ModelError(f"the checkpoint has statistics for '{key}' but not the weight itself")
        if "SCB" in tensors:
            if data.dtype != torch.int8 or data.dim() != 2 or tensors["SCB"].shape != (data.shape[0],):
                raise ModelError(f"'{key}' is not a valid 8-bit weight (int8 rows with one SCB scale each)")
            return QuantizedWeight(8, tuple(data.shape), data, tensors["SCB"].float())
        stats = {name: value for name, value in tensors.items() if name != "weight"}
        if not any(name.startswith(STAT_PREFIX) for name in stats):
            raise ModelError(f"'{key}' has quantization statistics bitsandbytes cannot read: {sorted(stats)}")
        try:
            state = bnb.functional.QuantState.from_dict(stats, device=torch.device("cpu"))
        except Exception as exc:
            raise ModelError(f"'{key}' has a corrupt 4-bit quant state ({exc})") from None
        absmax = state.absmax
        if state.nested:  # double quantization: the absmax are themselves 8-bit; keep them as float32 at runtime
            absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
        shape = tuple(int(d) for d in state.shape)
        if len(shape) != 2 or data.numel() * 2 != shape[0] * shape[1] or absmax.numel() * state.blocksize != (
                shape[0] * shape[1]) or state.blocksize != BLOCKSIZE:
            raise ModelError(f"'{key}' is not a valid 4-bit weight: its packed data does not match shape {shape}")
        return QuantizedWeight(4, shape, data.reshape(-1, 1), absmax.float(), state.code, state.quant_type,
                               state.dtype)


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, bnb) -> QuantizedWeight:
    """A float (out, in) weight → bitsandbytes storage, exactly as Params4bit/Int8Params would quantize it."""
    if spec.bits == 8:
        data, scb, _ = bnb.functional.int8_vectorwise_quant(weight.contiguous().to(torch.float16))
        return QuantizedWeight(8, tuple(weight.shape), data, scb)
    if weight.numel() % BLOCKSIZE:
        raise QuantizeError(f"a {tuple(weight.shape)} weight is not a whole number of {BLOCKSIZE}-value blocks")
    data, state = bnb.functional.quantize_4bit(weight.contiguous(), blocksize=BLOCKSIZE, compress_statistics=False,
                                              quant_type=spec.quant_type)
    return QuantizedWeight(4, tuple(weight.shape), data, state.absmax, state.code, spec.quant_type,
                           spec.compute_dtype)


def make_module(weight: QuantizedWeight, bias: torch.Tensor | None, spec: QuantSpec, bnb,
                device: torch.device) -> nn.Module:
    """A ready bitsandbytes module for a quantized weight (no float copy is ever made)."""
    out_features, in_features = weight.shape
    if weight.bits == 8:
        module = bnb.nn.Linear8bitLt(in_features, out_features, bias=bias is not None, has_fp16_weights=False,
                                     threshold=spec.threshold, device="meta")
        param = bnb.nn.Int8Params(weight.data.to(device), requires_grad=False, has_fp16_weights=False)
        param.CB, param.SCB = param.data, weight.scale.to(device)
    else:
        module = bnb.nn.Linear4bit(in_features, out_features, bias=bias is not None,
                                   compute_dtype=spec.compute_dtype, compress_statistics=False,
                                   quant_type=weight.quant_type, device="meta")
        state = bnb.functional.QuantState(absmax=weight.scale.to(device), shape=torch.Size(weight.shape),
                                          code=weight.code.to(device), blocksize=BLOCKSIZE,
                                          quant_type=weight.quant_type, dtype=spec.compute_dtype)
        param = bnb.nn.Params4bit(weight.data.to(device), requires_grad=False, quant_state=state,
                                  blocksize=BLOCKSIZE, compress_statistics=False, quant_type=weight.quant_type,
                                  module=module, bnb_quantized=True)
        module.quant_state = state
    module.weight = param
    module.bias = None if bias is None else nn.Parameter(bias.to(device, spec.compute_dtype), requires_grad=False)
    module.localgpt_bits = weight.bits
    return module.eval()


def module_weight(module: nn.Module) -> QuantizedWeight:
    """Read a bitsandbytes module back as a QuantizedWeight (to write it), or the native backend's module's."""
    stored = getattr(module, "stored", None)
    if isinstance(stored, QuantizedWeight):
        return stored
    if module.localgpt_bits == 8:
        scb = module.weight.SCB if module.weight.SCB is not None else module.state.SCB
        return QuantizedWeight(8, tuple(module.weight.shape), module.weight.data, scb)
    state = module.weight.quant_state
    if getattr(state, "packing_format_for_cpu", False):
        # bitsandbytes repacks a 4-bit weight for its CPU kernel on the first forward pass; written out in that
        # layout it reloads as garbage, so refuse rather than write it.
        raise QuantizeError("this 4-bit layer already ran on CPU and was repacked — quantize from the float model")
    return QuantizedWeight(4, tuple(int(d) for d in state.shape), module.weight.data, state.absmax, state.code,
                           state.quant_type, state.dtype)


def is_quantized(module: nn.Module) -> bool:
    return hasattr(module, "localgpt_bits")


def skipped(checkpoint_module: str, skip: tuple[str, ...]) -> bool:
    """transformers' rule for llm_int8_skip_modules: a name matches whole dotted components of the module path."""
    padded = f".{checkpoint_module}."
    return any(f".{name}." in padded for name in skip)


# --- writing a quantized model folder --------------------------------------------------------------------------

WEIGHT_FILES = (".safetensors", ".gguf", *PICKLE_SUFFIXES)


def checkpoint_tensors(model: nn.Module, bnb) -> dict[str, torch.Tensor]:
    """Every tensor under its checkpoint name (model.checkpoint_layout, set by the loader): quantized layers split
    back into their projections with transformers' statistic names, float tensors as they are."""
    tensors: dict[str, torch.Tensor] = {}
    for key, target in model.checkpoint_layout.items():
        module_name, kind = target.name.rsplit(".", 1)
        module = model.get_submodule(module_name)
        if is_quantized(module) and kind == "weight":
            weight = module_weight(module)
            if target.rows is not None:
                weight = weight.rows(target.row_offset, target.rows)
            for name, value in weight.checkpoint_tensors(key, bnb).items():
                tensors[name] = value.clone()  # slices and the shared code map: safetensors wants one owner each
            continue
        value = model.get_parameter(target.name).data
        if value.is_mkldnn:
            raise ModelError("the weights are packed for decoding — load with backend=None to write them")
        if target.rows is not None:
            value = value[target.row_offset : target.row_offset + target.rows].clone()
        tensors[key] = (value.t() if target.transpose else value).contiguous()
    return tensors


def write_quantized(model: nn.Module, source: Path, output: Path, force: bool = False) -> Path:
    """Write a quantized model as a folder transformers can load too; atomic (nothing is left on failure)."""
    from safetensors.torch import save_file

    from localgpt.atomic import atomic_folder
    from localgpt.config import read_json

    spec: QuantSpec = model.quantization
    bnb = load_bitsandbytes(model.device)
    tensors = checkpoint_tensors(model, bnb)
    config = read_json(source / "config.json", "model config")
    dtype_name = str(spec.compute_dtype).removeprefix("torch.")
    config.update(quantization_config=spec.to_config(), torch_dtype=dtype_name)
    if "dtype" in config:
        config["dtype"] = dtype_name
    if is_quantized(model.lm_head):  # a quantized copy of a tied embedding is written as an untied head
        for section in (config, config.get("text_config")):
            if isinstance(section, dict):
                section["tie_word_embeddings"] = False
    with atomic_folder(output, force) as scratch:
        save_file(tensors, str(scratch / "model.safetensors"), metadata={"format": "pt"})
        (scratch / "config.json").write_text(json.dumps(config, indent=2))
        for path in sorted(source.iterdir()):
            keep = path.is_file() and not path.name.endswith(WEIGHT_FILES) and path.name != "config.json"
            if keep and path.name not in ("model.safetensors.index.json", "localgpt.json"):
                shutil.copyfile(path, scratch / path.name)  # follows the HF cache's snapshot symlinks
        (scratch / "localgpt.json").write_text(json.dumps({"source": str(source), "quantization": spec.label}))
    return output
