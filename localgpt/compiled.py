"""torch.compile of the one-token decode step, opt-in (`--compile`).

For machines where localgpt's native backend cannot run (neither AVX-512 nor AVX2, or no C compiler); where they
run, it is skipped with a notice, because the compiled step was slower than them. Measured on SmolLM2-135M here
without the kernels (docs/benchmarks.md): +10-25% decode tok/s in float32 and nothing measurable in bfloat16 (whose
products are already one oneDNN call each), for 25-40 s of compilation with a warm inductor cache and 50-110 s cold,
so it is never on by default and the user is told before the wait. Prefill stays eager (its
products are large and dispatch is a small share of them). On CUDA the step is compiled with
mode="reduce-overhead" (CUDA graphs). If compilation fails (no C++ compiler, an
unsupported platform), the model keeps running eagerly after one notice.
"""

from __future__ import annotations

import sys

import torch

from localgpt.model import Transformer


def compile_decode(model: Transformer, notify=None) -> bool:
    """Compile model.run for one-token steps and warm it up (the compilation happens here, not mid-answer).
    Returns whether the compiled step is in use. `notify(message)` hears what is happening; default stderr."""
    notify = notify or (lambda message: print(f"localgpt: {message}", file=sys.stderr, flush=True))
    if model.backend is not None and model.backend.layers:
        # Inductor would replace the native layers with its own kernels: 36 against 51 tok/s in float32 and 65
        # against 79 in bfloat16 on SmolLM2 here (docs/benchmarks.md), after a minute of compiling.
        notify("--compile skipped: the native kernels decode faster than a compiled step here")
        return False
    mode = "reduce-overhead" if model.device.type == "cuda" else None
    notify("compiling the decode step with torch.compile (a minute the first time, less with a warm cache)")
    # dynamic=True: the position and the cache length change every step; without it each step would recompile.
    model.compiled_step = torch.compile(model.run, dynamic=True, mode=mode)
    try:
        warm_up(model)
    except Exception as exc:  # inductor reports a missing compiler or platform in many exception types
        model.compiled_step = None
        torch.compiler.reset()
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        notify(f"torch.compile is unavailable here ({reason[:160]}); decoding eagerly")
        return False
    return True


@torch.inference_mode()
def warm_up(model: Transformer) -> None:
    """Two one-token steps on a scratch cache: the first compiles, the second proves the dynamic graph serves a
    new position without recompiling."""
    cache = model.make_cache(1, 4)
    token = torch.zeros(1, 1, dtype=torch.long, device=model.device)
    model(torch.zeros(1, 2, dtype=torch.long, device=model.device), cache)  # eager prefill of two positions
    model(token, cache)
    model(token, cache)
