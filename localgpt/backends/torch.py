"""The torch backend: torch's own ops, with each linear layer's decoding product chosen for this device.

On CPU, for the few rows of decoding (one token, or one per beam):
- float32: one bmm over per-core row blocks of the weight (a view, no copy). MKL's product of one row and an
  (out, in) weight runs on one core; the blocked bmm spreads it over all of them (docs/benchmarks.md);
- bfloat16: the weight held in oneDNN's packed layout (same bytes, same results bit for bit), which multiplies
  a few rows much faster than F.linear (docs/benchmarks.md).
Prefill-sized inputs keep F.linear. CUDA keeps F.linear throughout.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from localgpt.backends.base import DECODE_ROWS, Backend, rebuilt_as
from localgpt.model import Linear, Transformer


def blocked_product(rows: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """rows (M, in) x weight (out, in)ᵀ → (M, out), as one bmm over `parts` row blocks of the weight (a view)."""
    blocks = weight.view(parts, -1, weight.shape[1])  # (N, out/N, in)
    y = torch.bmm(blocks, rows.t().unsqueeze(0).expand(parts, -1, -1))  # (N, out/N, M)
    return y.reshape(-1, rows.shape[0]).t()  # (M, out): a view when M == 1


@torch.library.custom_op("localgpt::blocked_product", mutates_args=())
def blocked_product_op(rows: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    """blocked_product as an opaque op for torch.compile: inductor's CPU lowering turns a product with one column
    into a generated multiply-and-sum loop, which made the compiled step slower than eager. (Eager calls the
    plain function: a custom op costs tens of microseconds of dispatch per call.)"""
    return blocked_product(rows, weight, parts).contiguous()


@blocked_product_op.register_fake
def _(rows: torch.Tensor, weight: torch.Tensor, parts: int) -> torch.Tensor:
    return rows.new_empty(rows.shape[0], weight.shape[0])


def packed_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x (..., in) x weight ᵀ + bias, with the weight in oneDNN's packed layout (PackedLinear)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [None], "")


@torch.library.custom_op("localgpt::packed_linear", mutates_args=())
def packed_linear_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """packed_linear for torch.compile, which cannot trace an oneDNN-layout weight itself."""
    return packed_linear(x, weight, bias)


@packed_linear_op.register_fake
def _(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def can_pack(dtype: torch.dtype) -> bool:
    return dtype == torch.bfloat16 and torch.backends.mkldnn.is_available() and \
        torch.ops.mkldnn._is_mkldnn_bf16_supported()


class PlainLinear(Linear):
    product_kind = "F.linear"


class BlockedLinear(Linear):
    """Decoding rows as one bmm over `parts` row blocks of the weight, one block per core."""

    product_kind = "blocked bmm"
    parts: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() > DECODE_ROWS * x.shape[-1]:
            return F.linear(x, self.weight, self.bias)
        *lead, in_features = x.shape
        product = blocked_product_op if torch.compiler.is_compiling() else blocked_product
        y = product(x.reshape(-1, in_features), self.weight, self.parts).reshape(*lead, -1)  # (..., out)
        return y if self.bias is None else y + self.bias


class PackedLinear(Linear):
    """bfloat16 weight in oneDNN's packed layout, for every row count."""

    product_kind = "oneDNN packed"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # under torch.compile the weight is a fake tensor that hides its layout: the class says it is packed
        product = packed_linear_op if torch.compiler.is_compiling() else packed_linear
        return product(x, self.weight, self.bias)


def faster_linear(model: Transformer, module: Linear, may_reorder: bool) -> nn.Module:
    """The torch product this layer decodes fastest with here. may_reorder=False keeps products that sum in
    another order than F.linear (blocked bmm) out; packing changes no bit."""
    tied_head = module is model.lm_head and model.lm_head.weight is model.embed_tokens.weight
    if model.device.type == "cpu" and can_pack(module.weight.dtype) and not tied_head:
        # (a packed copy of a tied head would cost its size again)
        packed = rebuilt_as(module, PackedLinear)
        packed.weight = nn.Parameter(torch.ops.mkldnn._reorder_linear_weight(module.weight.detach(), 1),
                                     requires_grad=False)
        return packed
    parts = torch.get_num_threads()
    if model.device.type == "cpu" and may_reorder and module.weight.dtype == torch.float32 and parts > 1 \
            and module.weight.shape[0] % parts == 0:
        blocked = rebuilt_as(module, BlockedLinear)
        blocked.parts = parts
        return blocked
    return rebuilt_as(module, PlainLinear)


def dequantize_head(model: Transformer) -> None:
    """On CPU, a bitsandbytes head becomes a float product of its dequantized weight: bitsandbytes' CPU int8 path
    with outlier columns made a quantized SmolLM2 decode at half the speed of its float head. (Where the native
    kernels run they read the quantized head as it is; this is the path without them.)"""
    from localgpt.quantize import is_quantized, load_bitsandbytes, module_weight

    head = model.lm_head
    if not is_quantized(head) or model.device.type != "cpu":
        return
    linear = Linear(head.in_features, head.out_features, bias=head.bias is not None)
    linear.weight = nn.Parameter(module_weight(head).dequantize(load_bitsandbytes(model.device), model.dtype),
                                 requires_grad=False)
    if head.bias is not None:
        linear.bias = nn.Parameter(head.bias.data.to(model.dtype), requires_grad=False)
    model.lm_head = linear


def install(model: Transformer, head_only: bool = False) -> Backend:
    dequantize_head(model)
    for name, module in [(n, m) for n, m in model.named_modules() if isinstance(m, Linear)]:
        model.set_submodule(name, faster_linear(model, module, not head_only or module is model.lm_head))
    return Backend("torch")
