"""Speed, installed after loading: a backend swaps some of the model's modules for subclasses with faster
decoding paths (the way the loader swaps in bitsandbytes layers), and the model never asks which one runs.

- `torch`: torch's own ops, with the product each weight decodes fastest with on this device (backends/torch.py);
- `native`: localgpt's C kernels (kernels.c, per ISA) for the few-row steps of decoding, and the torch backend for
  whatever they cannot run (backends/native.py);
- `auto`: native where its kernels run here, else torch.
`None` leaves the model as plain math: the layout a model that will be written keeps.

A swapped module is the same object state under another class (`rebuilt_as`): the same parameters, buffers and
children, so state_dict names, tied weights and the parity tests do not change.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from torch import nn

BACKENDS = ("auto", "torch", "native")
DECODE_ROWS = 16  # up to this many rows (tokens x beams) take the decoding paths of products, norms and MLPs


@dataclass
class Backend:
    """What install() put in place: its name, the kernels' ISA, and how many modules decode on each path."""

    name: str
    isa: str | None = None
    layers: Counter = field(default_factory=Counter)  # "whole-layer kernel" or "per op" → number of layers
    products: Counter = field(default_factory=Counter)  # product kind → number of linear layers

    def describe(self) -> str:
        """One line for --stats and bench: e.g. 'native (avx512) · layers: 30 whole-layer kernel ·
        products: 211 native'."""
        parts = [f"{self.name} ({self.isa})" if self.isa else self.name]
        if self.layers:
            parts.append("layers: " + ", ".join(f"{n} {kind}" for kind, n in self.layers.most_common()))
        parts.append("products: " + ", ".join(f"{n} {kind}" for kind, n in self.products.most_common()))
        return " · ".join(parts)


def rebuilt_as(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """`module` as an instance of its subclass `cls`, sharing its parameters, buffers and children (the old object
    is dropped by the caller)."""
    swapped = cls.__new__(cls)
    swapped.__dict__.update(module.__dict__)
    return swapped


def product_kind(module: nn.Module) -> str:
    """How a linear layer's decoding product runs: the backend's own label, else the quantized layer's class."""
    if hasattr(module, "localgpt_bits"):
        return f"bitsandbytes {type(module).__name__}"
    return module.product_kind


def install(model, name: str | None = "auto", head_only: bool = False) -> Backend | None:
    """Put a backend in place on a freshly loaded model and record it as model.backend.

    head_only, for quantized models: bitsandbytes' CPU kernels round their inputs coarsely, which magnifies
    last-bit differences from transformers into visible ones, so only the head (which feeds nothing) gets a
    product that sums in another order; bit-identical layouts (oneDNN packing) still apply everywhere."""
    if name is None:
        return None
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")
    from localgpt.backends import native
    from localgpt.backends import torch as torch_backend

    if name == "native" or name == "auto" and native.available(model):
        backend = native.install(model, head_only=head_only)
    else:
        backend = torch_backend.install(model, head_only=head_only)
    backend.products = Counter(product_kind(m) for m in linear_layers(model))
    model.backend = backend
    return backend


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """Every linear layer, ours or bitsandbytes', counted once (a tied head is the embedding, not a product)."""
    from localgpt.model import Linear

    return [m for m in model.modules() if isinstance(m, Linear) or hasattr(m, "localgpt_bits")]
