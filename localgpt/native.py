"""Native decoding kernels (kernels.c), built once per machine with the system C compiler and called via ctypes.

The steps of decoding a few rows (one token, or one per beam) on Linux CPUs with AVX-512, AVX2+FMA or ARM NEON:
products (float32 and bfloat16; bfloat16 through vdpbf16ps where the CPU has AVX512-BF16, else widened to float32
in registers), the one-token attention step, RMSNorm, the SiLU-gated MLP product and whole Llama-family layers.
Anything else, LOCALGPT_NATIVE=0 or no working C compiler leaves torch's own ops in place: the kernels only make
decoding faster, never different in kind. The library is cached in LOCALGPT_HOME/native under a name that hashes
the source, the compiler and the CPU's flags, and written atomically, so a change of any of them rebuilds it. gcc
is what it is built and tested with: its -fopenmp links libgomp.so.1, the OpenMP runtime torch ships, so the
kernels use torch's threads.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import subprocess
import sys
import tempfile
import weakref
from collections.abc import Callable
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("kernels.c")
MAX_HEAD_DIM = 512  # kernels.c holds one head in registers (its MAX_HEAD_DIM): wider heads keep torch attention
# The instruction sets kernels.c is written for, best first, each with every extension its code uses (as
# /proc/cpuinfo names them): AVX-512 F, BW and VL (the masked 16-bit loads of the bfloat16 tails), AVX2 with FMA,
# or on 64-bit ARM the NEON (asimd) every such CPU has.
# The tests compile kernels.c with exactly each set (ISA_BUILDS), so a use of anything else breaks the build on any
# host, and the run-time gate below checks the same sets.
ISA_FLAGS = {"avx512": {"avx512f", "avx512bw", "avx512vl"}, "avx2": {"avx2", "fma"}, "neon": {"asimd"}}
BF16_FLAG = "avx512_bf16"  # optional, with AVX-512: bfloat16 products through vdpbf16ps (kernels.c: __AVX512BF16__)
ISA_BUILDS = {  # gcc flags on top of the plain x86-64 baseline, for each build kernels.c claims
    "avx2": ["-march=x86-64", "-mavx2", "-mfma"],
    "avx512": ["-march=x86-64", *(f"-m{flag}" for flag in sorted(ISA_FLAGS["avx512"]))],
    "avx512-bf16": ["-march=x86-64", *(f"-m{flag}" for flag in sorted(ISA_FLAGS["avx512"])), "-mavx512bf16"],
    # optional too: the int8-activation products' 512-bit vpdpbusd form (kernels.c: __AVX512VNNI__)
    "avx512-vnni": ["-march=x86-64", *(f"-m{flag}" for flag in sorted(ISA_FLAGS["avx512"])), "-mavx512vnni"],
}
NEON_BUILD = ["-march=armv8-a"]  # with an aarch64 compiler (the tests cross-compile it and run it under qemu-user)
MACHINES = ("x86_64", "aarch64")
# -ffp-contract=off: a * b + c in plain C stays two roundings, as in torch (the rotary step is bit-exact to it)
COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
# Flags to pretend this CPU lacks (space or comma separated, /proc/cpuinfo's names): reproduces an AVX2-only CPU
# (LOCALGPT_CPU_FLAGS_MASK=avx512f), one without AVX512-BF16, or one with neither (avx512f,avx2) on any machine.
MASK_VARIABLE = "LOCALGPT_CPU_FLAGS_MASK"


PROJECTIONS = ("qkv", "o", "gate_up", "down")  # lg_block's order of projections, each dense or quantized
WEIGHTS = ("input_norm", "qkv", "qkv_bias", "o", "o_bias", "mlp_norm", "gate_up", "gate_up_bias", "down",
           "down_bias")


class BlockSpec(ctypes.Structure):
    """kernels.c's lg_block: one decoder layer's weights (addresses) and sizes."""
    _fields_ = [(name, ctypes.c_void_p) for name in WEIGHTS] + \
        [(name, ctypes.c_int64) for name in ("hidden", "heads", "kv_heads", "head_dim", "inner")] + \
        [(name, ctypes.c_float) for name in ("eps", "norm_offset", "scale", "softcap")] + \
        [("bits", ctypes.c_int64 * len(PROJECTIONS)), ("scales", ctypes.c_void_p * len(PROJECTIONS)),
         ("codes", ctypes.c_void_p * len(PROJECTIONS)), ("int8_activations", ctypes.c_int64)]


def masked_flags() -> set[str]:
    return set(os.environ.get(MASK_VARIABLE, "").replace(",", " ").split())


@functools.cache
def _cpuinfo_lines() -> tuple[str, ...]:
    """/proc/cpuinfo's lines, read once: a model's load asks for the flags and vendor per layer."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return tuple(cpuinfo)
    except OSError:
        return ()


def cpuinfo_field(*names: str) -> str | None:
    """The value of the first /proc/cpuinfo line that starts with one of these names, or None."""
    return next((line.split(":", 1)[1].strip() for line in _cpuinfo_lines() if line.startswith(names)), None)


def cpu_flags() -> set[str]:
    """This CPU's feature flags as /proc/cpuinfo names them ("flags" on x86, "Features" on ARM), less any that
    LOCALGPT_CPU_FLAGS_MASK hides."""
    return set((cpuinfo_field("flags", "Features") or "").split()) - masked_flags()


def cpu_vendor() -> str:
    """/proc/cpuinfo's vendor_id ("AuthenticAMD", "GenuineIntel"), or "" (ARM names none)."""
    return cpuinfo_field("vendor_id") or ""


def isa_for(flags: set[str]) -> str | None:
    """The best instruction set kernels.c has code for on a CPU with these flags, or None."""
    return next((isa for isa, needed in ISA_FLAGS.items() if needed <= flags), None)


def compile_flags() -> list[str]:
    """COMPILE_FLAGS, with -march=native told not to use what the mask hides (gcc spells avx512_bf16 avx512bf16)."""
    hidden = sorted(flag for flag in masked_flags() if flag.startswith(("avx", "fma")))  # ones gcc has -mno- for
    return COMPILE_FLAGS + [f"-mno-{flag.replace('_', '')}" for flag in hidden]


def find_compiler() -> str | None:
    import shutil

    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def notify_stderr(message: str) -> None:
    print(f"localgpt: {message}", file=sys.stderr)


def build(compiler: str, flags: set[str], target_dir: Path) -> Path:
    """Compile kernels.c into target_dir (once: the name says what it was built from) and return its path.
    Quietly: it takes under a second, once per machine, compiler or localgpt version."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), compiler, version, " ".join(sorted(flags)),
                                    " ".join(compile_flags())]).encode()).hexdigest()[:16]
    target = target_dir / f"kernels-{key}.so"
    if target.exists():
        return target
    target_dir.mkdir(parents=True, exist_ok=True)
    scratch = tempfile.NamedTemporaryFile(dir=target_dir, prefix=".kernels-", suffix=".so", delete=False)
    scratch.close()
    try:
        subprocess.run([compiler, *compile_flags(), str(SOURCE), "-o", scratch.name], check=True,
                       capture_output=True, text=True, timeout=300)
        os.replace(scratch.name, target)  # atomic: another process sees no library or a whole one
    finally:
        Path(scratch.name).unlink(missing_ok=True)
    return target


def load(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))  # after torch: its libgomp.so.1 is already loaded and ours resolves to it
    lib.lg_isa.restype = ctypes.c_char_p
    for function in lib.lg_linear_f32, lib.lg_linear_bf16:
        function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 3
        function.restype = None
    for function in lib.lg_attention_f32, lib.lg_attention_bf16:
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 9 + [ctypes.c_float] * 2
        function.restype = ctypes.c_int
    for function in lib.lg_rope_write_f32, lib.lg_rope_write_bf16:
        function.argtypes = [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 7 + [ctypes.c_int]
        function.restype = None
    for function in lib.lg_attention_f32_rows, lib.lg_attention_bf16_rows:
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2 + \
            [ctypes.c_int64] * 5 + [ctypes.c_float] * 2
        function.restype = ctypes.c_int
    for function in lib.lg_rope_write_f32_rows, lib.lg_rope_write_bf16_rows:
        function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] + [ctypes.c_void_p] * 3 + \
            [ctypes.c_int64] * 6 + [ctypes.c_void_p, ctypes.c_int]
        function.restype = None
    for function in lib.lg_decoder_block_f32_rows, lib.lg_decoder_block_bf16_rows:
        function.argtypes = [ctypes.POINTER(BlockSpec)] + [ctypes.c_void_p] * 4 + [ctypes.c_int64] + \
            [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 3 + [ctypes.c_int]
        function.restype = ctypes.c_int
    for function in lib.lg_silu_mul_f32, lib.lg_silu_mul_bf16:
        function.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int64] * 2
        function.restype = None
    for function in lib.lg_decoder_block_f32, lib.lg_decoder_block_bf16:
        function.argtypes = [ctypes.POINTER(BlockSpec)] + [ctypes.c_void_p] * 6 + [ctypes.c_int64] * 6 + [ctypes.c_int]
        function.restype = ctypes.c_int
    for function in (lib.lg_linear_q8_f32, lib.lg_linear_q8_bf16, lib.lg_linear_q4_f32, lib.lg_linear_q4_bf16,
                     lib.lg_linear_q4i8_f32, lib.lg_linear_q4i8_bf16):
        function.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 3
        function.restype = ctypes.c_int
    for function in lib.lg_dequantize_q8_f32, lib.lg_dequantize_q8_bf16:
        function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2
        function.restype = None
    for function in lib.lg_dequantize_q4_f32, lib.lg_dequantize_q4_bf16:
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int64]
        function.restype = None
    lib.lg_copy_rows.argtypes = [ctypes.c_int64] + [ctypes.c_void_p] * 10
    lib.lg_copy_rows.restype = ctypes.c_int
    lib.lg_top_candidates.argtypes = [ctypes.c_void_p] + [ctypes.c_int64] * 3 + [ctypes.c_void_p] * 2
    lib.lg_top_candidates.restype = ctypes.c_int
    for function in lib.lg_rms_norm_f32, lib.lg_rms_norm_bf16:
        function.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 2 + [ctypes.c_float] * 2
        function.restype = None
    return lib


@functools.cache
def library(notify: Callable[[str], None] = notify_stderr) -> ctypes.CDLL | None:
    """The loaded kernels, or None where they cannot run here (then torch's ops are used)."""
    if os.environ.get("LOCALGPT_NATIVE", "1") == "0":
        return None
    flags = cpu_flags()
    if sys.platform != "linux" or platform.machine() not in MACHINES or isa_for(flags) is None:
        return None
    compiler = find_compiler()
    if compiler is None:
        return None
    from localgpt.paths import home

    try:
        try:
            path = build(compiler, flags, home() / "native")
        except OSError:  # LOCALGPT_HOME unwritable: build in a scratch folder; the loaded library outlives it
            with tempfile.TemporaryDirectory(prefix="localgpt-native-") as scratch:
                return load(build(compiler, flags, Path(scratch)))
        return load(path)
    except (OSError, subprocess.SubprocessError, AttributeError) as error:
        output = (getattr(error, "stderr", None) or "").strip()
        reason = output.splitlines()[-1] if output else str(error)
        notify(f"native kernels unavailable ({compiler}: {reason}); using torch's ops")
        return None


def isa() -> str | None:
    """Which build of the kernels runs here ("avx512", "avx2", "neon"), or None where torch's ops run."""
    lib = library()
    return lib.lg_isa().decode() if lib is not None else None


def kernel(name: str, dtype: torch.dtype):
    """kernels.c's `lg_<name>_f32` or `lg_<name>_bf16` for tensors of this dtype."""
    return getattr(library(), f"lg_{name}_{'f32' if dtype == torch.float32 else 'bf16'}")


def kernel_rows(name: str, dtype: torch.dtype):
    """The variant for rows at their own positions: `lg_<name>_f32_rows` or `lg_<name>_bf16_rows`."""
    return getattr(library(), f"lg_{name}_{'f32' if dtype == torch.float32 else 'bf16'}_rows")


def supports(weight: torch.Tensor) -> bool:
    """True when decoding products with this weight (N, K) can run natively here."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not weight.is_contiguous():
        return False
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return False
    return library() is not None


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x (..., K) x weight (N, K)ᵀ → (..., N) in the weight's dtype; `supports(weight)` must hold."""
    x = x.contiguous()
    out = torch.empty(*x.shape[:-1], weight.shape[0], dtype=weight.dtype)
    kernel("linear", weight.dtype)(x.data_ptr(), weight.data_ptr(), out.data_ptr(), x.numel() // x.shape[-1],
                                   x.shape[-1], weight.shape[0])
    return out


Q4_BLOCK = 64  # kernels.c's 4-bit block (bitsandbytes' blocksize): its products need whole blocks per row


def supports_quantized(stored, dtype: torch.dtype) -> bool:
    """True when products of x in `dtype` with this bitsandbytes weight (a quantize.QuantizedWeight) can run
    natively here: float32 or bfloat16 activations, CPU tensors, and for 4-bit rows of whole 64-value blocks."""
    if dtype not in (torch.float32, torch.bfloat16) or stored.data.device.type != "cpu" or library() is None:
        return False
    if stored.bits == 4:
        return stored.shape[1] % Q4_BLOCK == 0 and stored.code is not None and stored.code.numel() == 16
    return stored.bits == 8


def _quantized_pointers(stored) -> tuple[int, int, int | None]:
    code = stored.code.data_ptr() if stored.bits == 4 else None
    return stored.data.data_ptr(), stored.scale.data_ptr(), code


def quantized_linear(x: torch.Tensor, stored, int8_activations: bool = False) -> torch.Tensor:
    """x (..., K) float32 or bfloat16 times a bitsandbytes weight (N, K)ᵀ → (..., N) in x's dtype, as bitsandbytes'
    dequantize-then-matmul in float32 computes it; `supports_quantized(stored, x.dtype)` must hold.
    int8_activations (4-bit only): x rounded to int8 per 64-value block and multiplied in integers, as llama.cpp's
    Q4_0 does (kernels.c, linear_q4i8: faster, not bitsandbytes' numerics)."""
    x = x.contiguous()
    N, K = stored.shape
    out = torch.empty(*x.shape[:-1], N, dtype=x.dtype)
    weights, scales, code = _quantized_pointers(stored)
    name = "linear_q4i8" if int8_activations and stored.bits == 4 else f"linear_q{stored.bits}"
    status = kernel(name, x.dtype)(x.data_ptr(), weights, scales, code, out.data_ptr(), x.numel() // K, K, N)
    if status != 0:
        raise MemoryError("the native quantized product could not allocate its scratch memory")
    return out


def dequantize(stored, dtype: torch.dtype) -> torch.Tensor:
    """The whole (N, K) weight in float32 or bfloat16, value for value what bitsandbytes' int8_vectorwise_dequant or
    dequantize_4bit gives (for products of many rows, where the weight is read once per prompt)."""
    N, K = stored.shape
    out = torch.empty(N, K, dtype=dtype)
    weights, scales, code = _quantized_pointers(stored)
    if stored.bits == 8:
        kernel("dequantize_q8", dtype)(weights, scales, out.data_ptr(), N, K)
    else:
        kernel("dequantize_q4", dtype)(weights, scales, code, out.data_ptr(), N * K)
    return out


def supports_dtype(dtype: torch.dtype, device: torch.device) -> bool:
    """True when attention and norms of this dtype can run natively here (no bfloat16 math is needed)."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16) and library() is not None


def attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
              softcap: float | None) -> torch.Tensor:
    """One query position per row: q (B, h, 1, hd), keys/values (B, g, S, hd) → (B, h, 1, hd), with q's heads
    grouped over the kv heads as in grouped-query attention. Views are read in place where their rows are
    contiguous (the cache's are)."""
    B, h, _, hd = q.shape
    if q.stride(-1) != 1:
        q = q.contiguous()
    if keys.stride(-1) != 1 or keys.stride(-2) != hd or values.stride() != keys.stride():
        keys, values = keys.contiguous(), values.contiguous()
    return _attend(q, keys.data_ptr(), values.data_ptr(), keys.shape[1], keys.shape[2], keys.stride(0),
                   keys.stride(1), scale, softcap)


def _attend(q: torch.Tensor, keys: int, values: int, g: int, S: int, kv_batch_stride: int, kv_head_stride: int,
            scale: float, softcap: float | None) -> torch.Tensor:
    B, h, _, hd = q.shape
    out = torch.empty(B, h, 1, hd, dtype=q.dtype)
    status = kernel("attention", q.dtype)(q.data_ptr(), keys, values, out.data_ptr(), B, h, g, S, hd, q.stride(0),
                                          q.stride(1), kv_batch_stride, kv_head_stride, scale, softcap or 0.0)
    if status != 0:
        raise MemoryError(f"native attention could not run (head_dim {hd}, {S} positions)")
    return out


def rope_tables(rope: tuple[torch.Tensor, torch.Tensor] | None, unused: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """cos and signed sin (1, 1, hd) as the kernels read them; without rope (learned positions) any tensor
    stands in, since the kernels are told not to rotate."""
    return (rope[0].contiguous(), rope[1].contiguous()) if rope is not None else (unused, unused)


def decode_attention(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, layer_cache, start: int,
                     num_heads: int, scale: float, softcap: float | None) -> torch.Tensor:
    """A whole one-token attention step at position `start` from the fused projection qkv (B, 1, (h + 2g) hd):
    rotate q and k (when rope is given), write k and v into the layer's cache, attend over the slots the cache
    names (its window, for a sliding layer) → (B, h, 1, hd)."""
    B = qkv.shape[0]
    keys, values = layer_cache.keys, layer_cache.values  # (B, g, slots, hd)
    _, g, _, hd = keys.shape
    slot, first, count = layer_cache.decode_slots(start)
    qkv = qkv.contiguous()
    q = torch.empty(B, num_heads, 1, hd, dtype=qkv.dtype)
    cos, sin = rope_tables(rope, q)
    batch_stride, head_stride = keys.stride(0), keys.stride(1)
    kernel("rope_write", qkv.dtype)(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), keys.data_ptr(),
                                    values.data_ptr(), B, num_heads, g, hd, batch_stride, head_stride, slot,
                                    rope is not None)
    skip = first * hd * keys.element_size()
    return _attend(q, keys.data_ptr() + skip, values.data_ptr() + skip, g, count, batch_stride, head_stride, scale,
                   softcap)


def row_tables(rope: tuple[torch.Tensor, torch.Tensor] | None, unused: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Per-row cos and signed sin (B, 1, 1, hd) as (B, hd) rows for the _rows kernels; without rope any tensor."""
    if rope is None:
        return unused, unused
    return rope[0].reshape(rope[0].shape[0], -1).contiguous(), rope[1].reshape(rope[1].shape[0], -1).contiguous()


def decode_attention_rows(qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, layer_cache,
                          positions: torch.Tensor, num_heads: int, scale: float,
                          softcap: float | None) -> torch.Tensor:
    """decode_attention for rows at their own positions (B,): each row rotates with its own tables, writes its
    own slot and reads its own slots (the layer cache says which) → (B, h, 1, hd)."""
    B = qkv.shape[0]
    keys, values = layer_cache.keys, layer_cache.values
    _, g, _, hd = keys.shape
    slots, firsts, counts = layer_cache.decode_rows(positions)
    qkv = qkv.contiguous()
    q = torch.empty(B, num_heads, 1, hd, dtype=qkv.dtype)
    cos, sin = row_tables(rope, q)
    batch_stride, head_stride = keys.stride(0), keys.stride(1)
    kernel_rows("rope_write", qkv.dtype)(qkv.data_ptr(), cos.data_ptr(), sin.data_ptr(), hd, q.data_ptr(),
                                         keys.data_ptr(), values.data_ptr(), B, num_heads, g, hd, batch_stride,
                                         head_stride, slots.data_ptr(), rope is not None)
    return attention_rows(q, keys, values, firsts, counts, scale, softcap)


def attention_rows(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, firsts: torch.Tensor,
                   counts: torch.Tensor, scale: float, softcap: float | None) -> torch.Tensor:
    """attention for rows that hold different positions: row b of q (B, h, 1, hd) reads counts[b] slots from
    slot firsts[b] of keys/values (B, g, slots, hd), whose rows must be contiguous (the cache's are)."""
    B, h, _, hd = q.shape
    out = torch.empty(B, h, 1, hd, dtype=q.dtype)
    status = kernel_rows("attention", q.dtype)(q.data_ptr(), keys.data_ptr(), values.data_ptr(), out.data_ptr(), B,
                                               h, keys.shape[1], firsts.data_ptr(), counts.data_ptr(), hd,
                                               q.stride(0), q.stride(1), keys.stride(0), keys.stride(1), scale,
                                               softcap or 0.0)
    if status != 0:
        raise MemoryError(f"native attention could not run (head_dim {hd})")
    return out


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float) -> torch.Tensor:
    """RMSNorm over the last dim of x as transformers computes it (see kernels.c); weight in x's dtype."""
    x = x.contiguous()
    out = torch.empty_like(x)
    rows, dim = x.numel() // x.shape[-1], x.shape[-1]
    kernel("rms_norm", x.dtype)(x.data_ptr(), weight.data_ptr(), out.data_ptr(), rows, dim, eps, weight_offset)
    return out


def silu_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up from the fused (..., 2 inner) projection → (..., inner), rounded as torch rounds."""
    gate_up = gate_up.contiguous()
    inner = gate_up.shape[-1] // 2
    out = torch.empty(*gate_up.shape[:-1], inner, dtype=gate_up.dtype)
    kernel("silu_mul", gate_up.dtype)(gate_up.data_ptr(), out.data_ptr(), gate_up.numel() // gate_up.shape[-1], inner)
    return out


def block_spec(tensors: tuple, **sizes) -> BlockSpec:
    """kernels.c's lg_block from one layer's tensors (in WEIGHTS order, None for an absent bias; a projection may
    be a quantize.QuantizedWeight instead of a tensor) and its sizes."""
    spec = BlockSpec(*[_address(t) for t in tensors], **sizes)
    for index, name in enumerate(PROJECTIONS):
        weight = tensors[WEIGHTS.index(name)]
        if not isinstance(weight, torch.Tensor):  # bitsandbytes' storage
            spec.bits[index] = weight.bits
            spec.scales[index] = weight.scale.data_ptr()
            spec.codes[index] = weight.code.data_ptr() if weight.bits == 4 else None
    spec.tensors = tensors  # the addresses stay valid while the spec holds the tensors
    return spec


def _address(tensor) -> int | None:
    if tensor is None:
        return None
    return tensor.data_ptr() if isinstance(tensor, torch.Tensor) else tensor.data.data_ptr()


def decoder_block(spec: BlockSpec, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, layer_cache,
                  start: int) -> torch.Tensor:
    """One decoder layer for one token per row at position `start`, x (B, 1, hidden) → (B, 1, hidden); writes the
    layer's cache."""
    keys, values = layer_cache.keys, layer_cache.values
    slot, first, count = layer_cache.decode_slots(start)
    x = x.contiguous()
    out = torch.empty_like(x)
    cos, sin = rope_tables(rope, x)
    status = kernel("decoder_block", x.dtype)(spec, x.data_ptr(), out.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                              keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1),
                                              x.shape[0], slot, first, count, rope is not None)
    if status != 0:
        raise MemoryError("the native decoder layer could not allocate its scratch memory")
    return out


def decoder_block_rows(spec: BlockSpec, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None,
                       layer_cache, positions: torch.Tensor) -> torch.Tensor:
    """decoder_block for rows at their own positions (B,)."""
    keys, values = layer_cache.keys, layer_cache.values
    slots, firsts, counts = layer_cache.decode_rows(positions)
    x = x.contiguous()
    out = torch.empty_like(x)
    cos, sin = row_tables(rope, x)
    hd = keys.shape[-1]
    status = kernel_rows("decoder_block", x.dtype)(spec, x.data_ptr(), out.data_ptr(), cos.data_ptr(),
                                                   sin.data_ptr(), hd, keys.data_ptr(), values.data_ptr(),
                                                   keys.stride(0), keys.stride(1), x.shape[0], slots.data_ptr(),
                                                   firsts.data_ptr(), counts.data_ptr(), rope is not None)
    if status != 0:
        raise MemoryError("the native decoder layer could not allocate its scratch memory")
    return out


class _CopyPlan:
    """What lg_copy_rows needs of a cache's buffers that does not change from one beam step to the next (their
    addresses, strides and sizes), made once per set of buffers: rebuilt every step it took ~0.15 ms, half of the
    reorder."""

    def __init__(self, buffers: list[torch.Tensor]):
        self.buffers = [weakref.ref(t) for t in buffers]  # not kept alive by the plan
        self.usable = all(t.device.type == "cpu" and t.is_contiguous() for t in buffers)
        count = len(buffers)
        self.bases = (ctypes.c_void_p * count)(*(t.data_ptr() for t in buffers))
        self.batch_strides = (ctypes.c_int64 * count)(*(t.stride(0) * t.element_size() for t in buffers))
        self.head_strides = (ctypes.c_int64 * count)(*(t.stride(1) * t.element_size() for t in buffers))
        self.heads = (ctypes.c_int64 * count)(*(t.shape[1] for t in buffers))
        self.row_bytes = (ctypes.c_int64 * count)(*(t.shape[3] * t.element_size() for t in buffers))


_copy_plan: _CopyPlan | None = None


def copy_rows(layers, moved: torch.Tensor, sources: torch.Tensor, shared: int) -> bool:
    """KVCache.reorder for every layer in one kernel call (each LayerCache's reordered_span); False where it cannot
    run here (no kernels, or buffers that are not contiguous CPU tensors), and nothing was copied."""
    lib = library()
    if lib is None:
        return False
    buffers = [tensor for layer in layers for tensor in (layer.keys, layer.values)]
    global _copy_plan
    # the same tensors (not merely the same addresses: a freed cache's memory can hold a new one of other shapes)
    if _copy_plan is None or len(_copy_plan.buffers) != len(buffers) or \
            any(ref() is not t for ref, t in zip(_copy_plan.buffers, buffers, strict=True)):
        _copy_plan = _CopyPlan(buffers)  # one cache at a time is reordered: only its plan is kept
    plan = _copy_plan
    if not plan.usable:
        return False
    spans = [layer.reordered_span(shared) for layer in layers]
    firsts = (ctypes.c_int64 * len(buffers))(*(span.start for span in spans for _ in range(2)))
    stops = (ctypes.c_int64 * len(buffers))(*(span.stop for span in spans for _ in range(2)))
    moved, sources = moved.to(torch.int64).contiguous(), sources.to(torch.int64).contiguous()
    status = lib.lg_copy_rows(len(buffers), plan.bases, plan.batch_strides, plan.head_strides, plan.heads,
                              plan.row_bytes, firsts, stops, moved.data_ptr(), sources.data_ptr(), len(moved))
    if status != 0:
        raise MemoryError("the native cache reorder could not allocate its scratch memory")
    return True


def top_candidates(scores: torch.Tensor, keep: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """torch.topk(scores.reshape(-1), keep) for float32 scores (rows, cols) on the CPU: the values and flat indices,
    best first. None where this cannot run or cannot say: no kernels, or a NaN or a tie among the best keep + 1,
    whose order is torch.topk's own."""
    lib = library()
    if lib is None or scores.dtype != torch.float32 or scores.device.type != "cpu":
        return None
    scores = scores.contiguous()
    values, indices = torch.empty(keep), torch.empty(keep, dtype=torch.int64)
    if lib.lg_top_candidates(scores.data_ptr(), scores.shape[0], scores.shape[1], keep, values.data_ptr(),
                             indices.data_ptr()) != 0:
        return None
    return values, indices
