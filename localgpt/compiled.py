"""torch.compile of the one-token decode step, opt-in (`--compile`).

For machines where localgpt's native backend cannot run (no kernels for the CPU, or no C compiler); where it runs
whole layers, compiling is skipped with a notice, because inductor's kernels replace the native ones and decode
slower. Without the kernels it pays a little in float32 and nothing in bfloat16 (whose products are already one
oneDNN call each) for tens of seconds of compilation (figures: docs/benchmarks.md), so it is never on by default
and the user is told before the wait. Prefill stays eager (its
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
        # Inductor would replace the native layers with its own, slower kernels (docs/benchmarks.md).
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
