"""The native backend: localgpt's C kernels (kernels.c through localgpt/native.py) for the few-row steps of
decoding on CPU, the torch backend for everything they cannot run.

Per layer, best first: the whole one-token layer as one kernel call (NativeBlock: Llama-family layers with RMSNorm,
a SiLU-gated MLP and native products throughout); else per op (NativeAttention, NativeRMSNorm, NativeMLP and
NativeLinear each where they apply: Qwen3's q/k norms, GPT-2's LayerNorm or Gemma's GELU keep torch for their part).
Prefill-sized inputs go through the model's own torch math.
"""

from __future__ import annotations

from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn

import localgpt.backends.torch as torch_backend
from localgpt import native
from localgpt.backends.base import DECODE_ROWS, Backend, rebuilt_as
from localgpt.model import MLP, Attention, Block, Linear, RMSNorm, Transformer
from localgpt.quantize import QuantizedWeight, QuantizeError, is_quantized, module_weight


@torch.library.custom_op("localgpt::native_linear", mutates_args=())
def native_linear_op(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """native.linear for torch.compile, which cannot trace a ctypes call (a quantized model's native head can be
    compiled with the rest of its step)."""
    return native.linear(x, weight)


@native_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def decoding(x: torch.Tensor) -> bool:
    """A few rows, outside torch.compile (inductor fuses its own): what the kernels are for."""
    return x.numel() <= DECODE_ROWS * x.shape[-1] and not torch.compiler.is_compiling()


class NativeLinear(Linear):
    """Decoding rows through kernels.c's products; a prompt through torch's, in float32 for a bfloat16 weight where
    that is the faster product (prompt_dtype)."""

    product_kind = "native"
    prompt_dtype: torch.dtype | None = None  # install() sets prompt_dtype(weight's dtype)
    prompt_product = staticmethod(F.linear)  # and prompt_product(prompt_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > DECODE_ROWS * x.shape[-1]:
            if self.prompt_dtype not in (None, self.weight.dtype):  # bfloat16 widens exactly; y is rounded once
                bias = None if self.bias is None else self.bias.to(self.prompt_dtype)
                return self.prompt_product(x.to(self.prompt_dtype), self.weight.to(self.prompt_dtype),
                                           bias).to(x.dtype)
            return self.prompt_product(x, self.weight, self.bias)
        y = (native_linear_op if torch.compiler.is_compiling() else native.linear)(x, self.weight)  # (..., out)
        return y if self.bias is None else y + self.bias


class NativeQuantizedLinear(nn.Module):
    """A bitsandbytes layer (Linear8bitLt or Linear4bit) whose weight kernels.c reads as bitsandbytes stores it: a
    few rows decode through the quantized products; prompts multiply the dequantized weight with torch's product,
    as bitsandbytes does on CPU (in float32 for a bfloat16 model where that is the faster product: prompt_dtype).
    Either way the result is bitsandbytes' dequantize-then-matmul (for 8-bit without its int8 rounding of the
    activations, which its outlier threshold exists to limit), unless int8_activations is on."""

    def __init__(self, stored: QuantizedWeight, bias: torch.Tensor | None, dtype: torch.dtype, source: str):
        super().__init__()
        self.stored, self.dtype = stored, dtype
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self.weight = nn.Parameter(stored.data, requires_grad=False)  # the stored bytes, counted by weight_bytes
        self.localgpt_bits = stored.bits
        self.int8_activations = False  # use_int8_activations() turns it on for 4-bit layers
        self.prompt_dtype = prompt_dtype(dtype)
        self.prompt_product = prompt_product(self.prompt_dtype)
        self.source = source  # the bitsandbytes class it replaced, for describe()

    @property
    def product_kind(self) -> str:
        if self.stored.bits == 8:
            return "native 8-bit"
        return f"native 4-bit {self.stored.quant_type}" + (" · int8 activations" if self.int8_activations else "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.dtype)
        if x.numel() <= DECODE_ROWS * x.shape[-1]:
            y = native.quantized_linear(x, self.stored, self.int8_activations)  # (..., out)
            return y if self.bias is None else y + self.bias
        if self.prompt_dtype != self.dtype:  # bfloat16 x widens exactly; y is rounded back once
            bias = None if self.bias is None else self.bias.float()
            return self.prompt_product(x.float(), native.dequantize(self.stored, torch.float32), bias).to(self.dtype)
        return self.prompt_product(x, native.dequantize(self.stored, self.dtype), self.bias)


def prompt_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a prompt's products with a bfloat16 weight run in, dense or dequantized from 8 or 4 bits: torch's
    bfloat16 matmul where it is the faster one, float32 of the widened weight elsewhere (bfloat16 widens exactly,
    and y is rounded once). Measured for 128 rows against float32: 4x as fast on a Zen 5 and 1.6x on a Zen 4 (AMD,
    AVX512-BF16), fast through AMX tiles on a Xeon that has them, but 0.6x on a Xeon with AVX512-BF16 and no AMX,
    and 0.2x on AVX2, which has no bfloat16 dot product at all (a 128-token SmolLM2 prompt took 1.7 s on a Zen 3,
    against 0.36 s in float32)."""
    if dtype != torch.bfloat16:
        return dtype
    flags = native.cpu_flags()
    if "amx_bf16" in flags or "avx512_bf16" in flags and native.cpu_vendor() == "AuthenticAMD":
        return torch.bfloat16
    return torch.float32


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear in float32 through oneDNN's matmul instead of MKL's sgemm (same float32 math, summed in another
    order), for prompt_product."""
    if torch.compiler.is_compiling():
        return F.linear(x, weight, bias)
    # the op inductor's frozen graphs call: it takes and gives dense tensors (mkldnn_linear's conversions to and
    # from oneDNN's layout cost 20% of a 4,096-token prompt)
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.view(*x.shape[:-1], weight.shape[0])


def prompt_product(dtype: torch.dtype):
    """The product a prompt's rows multiply a weight by in this dtype: F.linear (MKL's sgemm for float32), except
    float32 on AMD, where MKL's sgemm runs its AVX2 code: oneDNN's matmul took 128 rows of SmolLM2's products at
    342-412 GFLOPS against MKL's 144-186 on a 2-core Zen 5, and held to AVX2 (ONEDNN_MAX_CPU_ISA=AVX2, a Zen 3's
    instructions) at 152-209 against 120-174."""
    if dtype == torch.float32 and native.cpu_vendor() == "AuthenticAMD" and {"avx2", "fma"} <= native.cpu_flags() \
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return onednn_linear
    return F.linear


def native_quantized(module: nn.Module, dtype: torch.dtype) -> NativeQuantizedLinear | None:
    """The native replacement of a bitsandbytes layer of ours, or None where its kernels cannot run it (a GPU, a
    float16 compute dtype, a 4-bit row that is not whole blocks, or a layer bitsandbytes already repacked)."""
    try:
        stored = module_weight(module)
    except QuantizeError:
        return None
    compute = getattr(module, "compute_dtype", None) or dtype
    if not native.supports_quantized(stored, compute):
        return None
    bias = None if module.bias is None else module.bias.data.to(compute)
    return NativeQuantizedLinear(stored, bias, compute, type(module).__name__)


class NativeRMSNorm(RMSNorm):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decoding(x):
            return native.rms_norm(x, self.weight, self.eps, self.weight_offset)
        return super().forward(x)


class NativeMLP(MLP):
    """SiLU-gated only: act(gate) * up in one kernel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if decoding(x):
            return self.down_proj(native.silu_mul(self.gate_up_proj(x)))
        return super().forward(x)


class NativeAttention(Attention):
    """One-token steps: rotation, cache write and attention in kernels (q/k-normed heads: attention only)."""

    def forward(self, x: torch.Tensor, rope, cache, start: int) -> torch.Tensor:
        B, T, _ = x.shape
        if T == 1 and isinstance(start, torch.Tensor) and not self.qk_norm:  # rows at their own positions
            out = native.decode_attention_rows(self.qkv_proj(x), rope, cache, start, self.num_heads, self.scale,
                                               self.softcap)  # (B, h, 1, hd)
            return self.o_proj(out.view(B, 1, self.num_heads * self.head_dim))
        if T == 1 and isinstance(start, int) and not self.qk_norm and not torch.compiler.is_compiling():
            h = self.num_heads
            out = native.decode_attention(self.qkv_proj(x), rope, cache, start, h, self.scale,
                                          self.softcap)  # (B, h, 1, hd)
            return self.o_proj(out.view(B, 1, h * self.head_dim))
        return super().forward(x, rope, cache, start)

    def attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, start: int,
               first_key: int | None) -> torch.Tensor:
        if q.shape[2] != 1 or torch.compiler.is_compiling():
            return super().attend(q, keys, values, start, first_key)
        if self.window is not None:  # the window is a slice of the last positions (all of a ring's)
            keys, values = keys[:, :, -self.window :], values[:, :, -self.window :]
        return native.attention(q, keys, values, self.scale, self.softcap)  # (B, h, 1, hd)


class NativeBlock(Block):
    """The whole one-token layer in one kernel call, from the layer's weights as kernels.c's lg_block."""

    spec: native.BlockSpec

    def forward(self, x, rope, cache, start: int) -> torch.Tensor:
        if x.shape[1] == 1 and isinstance(start, torch.Tensor):
            return native.decoder_block_rows(self.spec, x, rope, cache, start)
        if x.shape[1] == 1 and isinstance(start, int) and not torch.compiler.is_compiling():
            return native.decoder_block(self.spec, x, rope, cache, start)
        return super().forward(x, rope, cache, start)


def available(model: Transformer) -> bool:
    return model.device.type == "cpu" and native.library() is not None


def block_spec(block: Block, dtype: torch.dtype) -> native.BlockSpec | None:
    """The layer as kernels.c's lg_block, or None when one of its parts has no native path (GPT-2's LayerNorm,
    Gemma's GELU or sandwich norms, Qwen3's q/k norms, packed or bitsandbytes-run projections)."""
    attn, mlp = block.attn, block.mlp
    if block.sandwich or not (isinstance(attn, NativeAttention) and not attn.qk_norm and isinstance(mlp, NativeMLP)
                              and isinstance(block.input_norm, NativeRMSNorm)
                              and isinstance(block.mlp_norm, NativeRMSNorm)):
        return None
    projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if not all(isinstance(p, NativeLinear) or isinstance(p, NativeQuantizedLinear) and p.dtype == dtype
               for p in projections):
        return None
    if block.input_norm.eps != block.mlp_norm.eps or block.input_norm.weight_offset != block.mlp_norm.weight_offset:
        return None
    qkv, o, gate_up, down = (p.stored if isinstance(p, NativeQuantizedLinear) else p.weight for p in projections)
    tensors = (block.input_norm.weight, qkv, attn.qkv_proj.bias, o, attn.o_proj.bias, block.mlp_norm.weight, gate_up,
               mlp.gate_up_proj.bias, down, mlp.down_proj.bias)
    return native.block_spec(tensors, hidden=block.input_norm.weight.shape[0], heads=attn.num_heads,
                             kv_heads=attn.num_kv_heads, head_dim=attn.head_dim, inner=down.shape[1],
                             eps=block.input_norm.eps,
                             norm_offset=block.input_norm.weight_offset, scale=attn.scale,
                             softcap=attn.softcap or 0.0)


def install(model: Transformer, head_only: bool = False, whole_layers: bool = True) -> Backend:
    """Swap in the native modules wherever they run here, the torch backend's products elsewhere. whole_layers=False
    keeps the per-op path for every layer (the tests compare the two bit for bit)."""
    if not available(model):
        return torch_backend.install(model, head_only)
    for name, module in [(n, m) for n, m in model.named_modules() if is_quantized(m)]:
        replacement = native_quantized(module, model.dtype)
        if replacement is not None:
            model.set_submodule(name, replacement)
    # head_only protects bitsandbytes' own CPU products (see backends.install); once none is left, every layer can
    # take the native paths
    head_only = head_only and any(is_quantized(m) and not isinstance(m, NativeQuantizedLinear)
                                  for m in model.modules())
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]:
        may_reorder = not head_only or module is model.lm_head
        if may_reorder and native.supports(module.weight):
            model.set_submodule(name, rebuilt_as(module, NativeLinear))
            native_linear = model.get_submodule(name)
            native_linear.prompt_dtype = prompt_dtype(module.weight.dtype)
            native_linear.prompt_product = prompt_product(native_linear.prompt_dtype)
        else:
            model.set_submodule(name, torch_backend.faster_linear(model, module, may_reorder))
    layers = Counter()
    if not head_only and native.supports_dtype(model.dtype, model.device):
        for name, module in list(model.named_modules()):
            if type(module) is RMSNorm:
                model.set_submodule(name, rebuilt_as(module, NativeRMSNorm))
            elif type(module) is MLP and module.gated and module.act is F.silu:
                model.set_submodule(name, rebuilt_as(module, NativeMLP))
            elif type(module) is Attention and module.head_dim <= native.MAX_HEAD_DIM:
                model.set_submodule(name, rebuilt_as(module, NativeAttention))
        for index, layer in enumerate(model.layers):
            spec = block_spec(layer, model.dtype) if whole_layers else None
            if spec is not None:
                model.layers[index] = rebuilt_as(layer, NativeBlock)
                model.layers[index].spec = spec
                layers["whole-layer kernel"] += 1
            else:
                layers["per op"] += 1
    return Backend("native", isa=native.isa(), layers=layers)


def use_int8_activations(model: Transformer) -> int:
    """Decode every native 4-bit product with int8 activations (native.quantized_linear), the whole-layer kernels
    included; returns how many products now do. Products of more rows (prompts) still multiply the dequantized
    weight in float."""
    switched = [m for m in model.modules() if isinstance(m, NativeQuantizedLinear) and m.stored.bits == 4]
    for module in switched:
        module.int8_activations = True
    for layer in model.layers:
        if isinstance(layer, NativeBlock):
            layer.spec.int8_activations = 1
    return len(switched)
