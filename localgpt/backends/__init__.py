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

from localgpt.backends.base import BACKENDS, Backend, linear_layers, product_kind

__all__ = ["BACKENDS", "Backend", "install", "use_int8_activations"]


def install(model, name: str | None = "auto", head_only: bool = False) -> Backend | None:
    """Put a backend in place on a freshly loaded model and record it as model.backend.

    head_only, for quantized models: bitsandbytes' CPU kernels round their inputs coarsely, which magnifies
    last-bit differences from transformers into visible ones, so only the head (which feeds nothing) gets a
    product that sums in another order; bit-identical layouts (oneDNN packing) still apply everywhere."""
    if name is None:
        return None
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r}: choose one of {', '.join(BACKENDS)}")
    import localgpt.backends.native as native_backend
    import localgpt.backends.torch as torch_backend

    if name == "native" or name == "auto" and native_backend.available(model):
        backend = native_backend.install(model, head_only=head_only)
    else:
        backend = torch_backend.install(model, head_only=head_only)
    backend.products = Counter(product_kind(m) for m in linear_layers(model))
    model.backend = backend
    return backend


def use_int8_activations(model) -> int:
    """Opt in, after install(), to 4-bit products that round their activations to int8 per 64-value block and
    multiply integers, as llama.cpp's Q4_0 does: faster decoding, no longer bitsandbytes' numerics (the cost in
    perplexity: docs/quantization.md). Only the native kernels have them; returns how many products switched (0
    under the torch backend, on a model without 4-bit layers, or without the kernels)."""
    backend = getattr(model, "backend", None)
    if backend is None or backend.name != "native":
        return 0
    import localgpt.backends.native as native_backend

    switched = native_backend.use_int8_activations(model)
    backend.products = Counter(product_kind(m) for m in linear_layers(model))
    return switched
