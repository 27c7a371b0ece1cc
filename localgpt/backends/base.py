"""What every backend shares: the record of what was installed, and the module swap itself."""


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
    if hasattr(module, "product_kind"):
        return module.product_kind
    return f"bitsandbytes {type(module).__name__}"


def linear_layers(model: nn.Module) -> list[nn.Module]:
    """Every linear layer, ours or bitsandbytes', counted once (a tied head is the embedding, not a product)."""
    from localgpt.model import Linear

    return [m for m in model.modules() if isinstance(m, Linear) or hasattr(m, "localgpt_bits")]
