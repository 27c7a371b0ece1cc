"""Safetensors checkpoints → a Transformer, with bounded memory and clear errors.

The model is built on the `meta` device, its parameters are allocated once in the chosen dtype, and every
checkpoint tensor is read from the file straight into its place (a row slice of a fused q/k/v or gate/up
parameter). Only a tensor that needs a dtype conversion or a transpose passes through one temporary buffer, so
peak memory is the weights plus the largest single tensor. Pickled checkpoints are never opened.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from localgpt import backends, interrupts
from localgpt.checkpoint import TensorEntry, checkpoint_files, quantized_weight_key, read_safetensors_header
from localgpt.config import ModelConfig, read_json
from localgpt.errors import ModelError, UsageError
from localgpt.families import Target, family_for
from localgpt.model import Linear, Transformer
from localgpt.native import notify_stderr
from localgpt.quantize import (
    DEFAULT_INT8_THRESHOLD,
    QuantizedWeight,
    QuantSpec,
    load_bitsandbytes,
    make_module,
    parse_spec,
    quantize_weight,
    skipped,
    spec_from_config,
)


def _writable_buffer(tensor: torch.Tensor):
    """A writable memoryview over a contiguous CPU tensor's bytes (for file.readinto)."""
    nbytes = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * nbytes).from_address(tensor.data_ptr())).cast("B")


def _read_into(file, entry: TensorEntry, destination: torch.Tensor, path: Path) -> None:
    file.seek(entry.offset)
    view = _writable_buffer(destination)
    filled = 0
    while filled < entry.nbytes:
        count = file.readinto(view[filled:])
        if not count:
            raise ModelError(f"{path} ended early while reading '{entry.name}' — download it again")
        filled += count


def choose_dtype(name: str, device: torch.device) -> torch.dtype:
    """--dtype → torch dtype. auto: bfloat16 on CUDA; on CPU float32 (measured faster here, docs/benchmarks.md)."""
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return names[name]


@contextlib.contextmanager
def _skip_random_init():
    """Modules built on `meta` still run their random init, which is slow there and useless: skip it."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "trunc_normal_", "ones_", "zeros_")
    saved = {name: getattr(torch.nn.init, name) for name in names}
    try:
        for name in names:
            setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for name, function in saved.items():
            setattr(torch.nn.init, name, function)


def _module_name(parameter_name: str) -> str:
    return parameter_name.rsplit(".", 1)[0]


def load_weights(model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                 quantize: QuantSpec | None = None, backend: str | None = "auto") -> Transformer:
    """Read a checkpoint into a new Transformer. A bitsandbytes checkpoint (quantized weights and their statistics
    in transformers' names) loads its quantized layers as they are; `quantize` quantizes a float checkpoint's
    linear layers as each weight is complete, so only one float layer at a time is held beside the result.
    `backend` (localgpt/backends: auto, torch, native) is then installed for decoding; None keeps the plain
    layout, as a model that will be written must."""
    model = _read_weights(model_dir, config, dtype, device, quantize)
    # Only now, with the reader's buffers gone: packing while they were alive raised peak RSS by 200 MB
    # (bfloat16 SmolLM2), since the memory they freed afterwards was not returned to the system.
    backends.install(model, backend, head_only=model.quantization is not None)
    return model


def _read_weights(model_dir: Path, config: ModelConfig, dtype: torch.dtype, device: torch.device,
                  quantize: QuantSpec | None) -> Transformer:
    family = family_for(config.model_type)
    headers = [(path, read_safetensors_header(path)) for path in checkpoint_files(model_dir)]
    stats = {quantized_weight_key(key) for _, entries in headers for key in entries} - {None}
    stored_quantized = {weight_key for weight_key, _ in stats}
    layout: dict[str, Target] = {}  # checkpoint weight/bias name → where it lives in our model
    for _, entries in headers:
        for key in entries:
            if quantized_weight_key(key) or (config.tie_word_embeddings and key == "lm_head.weight"):
                continue  # statistics travel with their weight; a tied head is the embedding
            target = family.target(config, key)
            if target is not None:
                layout[key] = target

    with torch.device("meta"), _skip_random_init():
        model = Transformer(config)
    # Linear layers stored quantized never get a float weight; layers to quantize on load get one, filled and then
    # replaced as soon as it is complete.
    quantized_modules = {_module_name(layout[key].name) for key in stored_quantized if key in layout}
    to_quantize: set[str] = set()
    if quantize is not None and not quantized_modules:
        linear_weights = {t.name for t in layout.values() if t.name.endswith(".weight")
                          and isinstance(model.get_submodule(_module_name(t.name)), Linear)}
        skipped_modules = {_module_name(t.name) for key, t in layout.items()
                           if t.name in linear_weights and skipped(_module_name(key), quantize.skip)}
        to_quantize = {_module_name(name) for name in linear_weights} - skipped_modules
    # A tied head is the embedding, which stays as it is; unless the spec quantizes lm_head too, when the head becomes
    # its own quantized copy of the embedding (written untied: bitsandbytes' format has no quantized embedding)
    quantize_head = bool(quantize is not None and config.tie_word_embeddings and not quantized_modules
                         and not skipped("lm_head", quantize.skip))
    if config.tie_word_embeddings:
        to_quantize.discard("lm_head")
    quantized_shapes = {}
    for name in quantized_modules:
        linear = model.get_submodule(name)
        if not isinstance(linear, Linear):
            raise ModelError(f"{model_dir}: '{name}' is stored quantized but is not a linear layer")
        quantized_shapes[name] = tuple(linear.weight.shape)
        linear.weight = None
    model = model.to(dtype=dtype).to_empty(device=device)
    model.tie_weights()  # to_empty allocates per parameter; re-share the tied head
    model.eval().requires_grad_(False)
    params = dict(model.named_parameters(remove_duplicate=False))
    rows_filled = {name: 0 for name in params}
    quantized_parts: dict[str, list[tuple[int, int, dict[str, torch.Tensor], str]]] = {}
    ready: dict[str, QuantizedWeight] = {}
    bnb = load_bitsandbytes(device) if quantized_modules or to_quantize or quantize_head else None
    for path, entries in headers:
        with open(path, "rb", buffering=0) as file:
            for key, entry in entries.items():
                interrupts.checkpoint()  # a deferred Ctrl-C ends the load here, between tensors
                stat = quantized_weight_key(key)
                weight_key, part = stat if stat else (key, "weight")
                if weight_key in stored_quantized:
                    target = layout.get(weight_key)
                    if target is None:
                        continue
                    values = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
                    _read_into(file, entry, values, path)
                    parts = quantized_parts.setdefault(_module_name(target.name), [])
                    slot = next((p for p in parts if p[0] == target.row_offset), None)
                    if slot is None:
                        slot = (target.row_offset, target.rows, {}, weight_key)
                        parts.append(slot)
                    slot[2][part] = values
                    continue
                target = layout.get(key)
                if target is None:
                    continue  # buffers we recompute (rotary tables, GPT-2's mask) or parts we do not run
                if target.name not in params:
                    raise ModelError(f"{path.name}: tensor '{key}' does not fit this {config.model_type} config")
                param = params[target.name]
                shape = entry.shape[::-1] if target.transpose else entry.shape
                rows = param.shape[0] if target.rows is None else target.rows
                expected = (rows, *param.shape[1:])
                if tuple(shape) != expected:
                    raise ModelError(
                        f"{path.name}: tensor '{key}' has shape {list(entry.shape)}, expected "
                        f"{list(expected[::-1] if target.transpose else expected)} — the weights do not match "
                        "config.json"
                    )
                destination = param.data[target.row_offset : target.row_offset + rows]
                direct = getattr(torch, entry.dtype) == dtype and not target.transpose and device.type == "cpu"
                if direct:
                    _read_into(file, entry, destination, path)
                else:
                    staging = torch.empty(entry.shape, dtype=getattr(torch, entry.dtype))
                    _read_into(file, entry, staging, path)
                    destination.copy_(staging.t() if target.transpose else staging)
                    del staging
                rows_filled[target.name] += rows
                module_name = _module_name(target.name)
                if module_name in to_quantize and target.name.endswith(".weight") and \
                        rows_filled[target.name] == param.shape[0]:
                    ready[module_name] = quantize_weight(param.data, quantize, bnb)
                    model.get_submodule(module_name).weight = None  # frees the float weight now
                    del params[target.name]
    for name, parts in quantized_parts.items():
        ready[name] = _assemble(model_dir, quantized_shapes[name], parts, bnb)
    missing = [
        name for name, param in params.items()
        if rows_filled[name] < param.shape[0] and not (name == "lm_head.weight" and config.tie_word_embeddings)
    ]
    if missing and missing == ["lm_head.weight"]:
        # Some checkpoints tie the head without saying so: no lm_head tensor means the embedding is the head.
        model.lm_head.weight = model.embed_tokens.weight
        missing = []
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise ModelError(f"{model_dir}: the checkpoint is missing tensors for {shown} — download it again")
    if quantize_head:
        ready["lm_head"] = quantize_weight(model.embed_tokens.weight.data, quantize, bnb)
        layout["lm_head.weight"] = Target("lm_head.weight")
    spec = quantize or (spec_from_config(read_json(model_dir / "config.json", "model config"), "config.json")
                        if quantized_modules else None)
    if spec is not None:
        _install_quantized(model, ready, spec, bnb, device)
    model.checkpoint_layout = layout
    model.quantization = spec
    return model


def _assemble(model_dir: Path, shape: tuple[int, int], parts, bnb) -> QuantizedWeight:
    """One fused layer from its stored quantized projections (q, k, v → qkv), checked against the config."""
    weights = []
    for _, rows, tensors, key in sorted(parts, key=lambda part: part[0]):
        weight = QuantizedWeight.from_checkpoint(tensors, key, bnb)
        if rows is not None and weight.shape[0] != rows:
            raise ModelError(f"{model_dir}: '{key}' has {weight.shape[0]} rows, config.json says {rows}")
        weights.append(weight)
    joined = QuantizedWeight.join(weights)
    if tuple(joined.shape) != shape:
        raise ModelError(f"{model_dir}: quantized '{parts[0][3]}' has shape {list(joined.shape)} but config.json "
                         f"makes the layer {list(shape)} — the weights do not match config.json")
    return joined


def _install_quantized(model: Transformer, ready: dict[str, QuantizedWeight], spec: QuantSpec, bnb,
                       device: torch.device) -> None:
    """Swap the quantized layers in; everything left in float runs in the compute dtype."""
    for name, weight in ready.items():
        linear = model.get_submodule(name)
        model.set_submodule(name, make_module(weight, linear.bias, spec, bnb, device))
    for param in model.parameters():
        if param.dtype.is_floating_point and param.dtype != spec.compute_dtype:
            param.data = param.data.to(spec.compute_dtype)


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer  # noqa: F821 - imported lazily
    config: ModelConfig
    generation_defaults: dict
    path: Path


def choose_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError(f"--device {name}: no CUDA device is available here — use --device cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ModelError(f"--device {name!r} is not a device torch knows (try cpu or cuda)") from None


def load_model(model_dir: Path, dtype: str = "auto", device: str = "auto", quantize: str | None = None,
               skip: str | None = None, int8_threshold: float = DEFAULT_INT8_THRESHOLD,
               backend: str | None = "auto", int8_activations: bool = False,
               notify: Callable[[str], None] = notify_stderr) -> LoadedModel:
    """A model folder → model, tokenizer and config, ready to generate. `quantize` (8, 4, nf4, fp4) quantizes a
    float model's linear layers while loading; a bitsandbytes checkpoint loads quantized by itself. With
    quantization, `dtype` is the compute dtype (auto: the checkpoint's, or the faster one for this device).
    int8_activations: the 4-bit layers decode with int8 activations (backends.use_int8_activations); a model
    without 4-bit layers is refused, and `notify` says so where the kernels cannot run here."""
    from localgpt.config import load_generation_defaults
    from localgpt.families import load_config
    from localgpt.tokenizer import Tokenizer

    config = load_config(model_dir)
    tokenizer = Tokenizer(model_dir, config.eos_token_ids)
    torch_device = choose_device(device)
    stored = spec_from_config(read_json(model_dir / "config.json", "model config"), f"{model_dir}/config.json")
    if stored is not None and quantize:
        raise UsageError(f"{model_dir.name} is already quantized ({stored.label}) — drop --quantize")
    if quantize:
        spec = parse_spec(quantize, None if dtype == "auto" else dtype, skip, torch_device, int8_threshold)
    else:
        spec = stored
    if spec is not None and dtype != "auto":
        spec = replace(spec, compute_dtype=choose_dtype(dtype, torch_device))
    # Weights are quantized from the compute dtype, as transformers does: quantizing float32 weights and then
    # running 8-bit in bfloat16 matched neither transformers nor the float model (measured on SmolLM2).
    load_dtype = spec.compute_dtype if spec else choose_dtype(dtype, torch_device)
    # Under the CLI a Ctrl-C waits for the next tensor (the checkpoint in the read loop), not inside torch's or
    # bitsandbytes' native code (localgpt/interrupts.py); a library caller keeps Python's own behaviour.
    with interrupts.deferred():
        model = load_weights(model_dir, config, load_dtype, torch_device, quantize=spec, backend=backend)
    if int8_activations:
        if spec is None or spec.bits != 4:
            raise UsageError(f"--int8-activations is for 4-bit models (-q nf4, -q fp4 or a 4-bit folder); "
                             f"{model_dir.name} is {spec.label if spec else 'not quantized'}")
        if backends.use_int8_activations(model) == 0:
            notify("int8 activations need localgpt's native kernels, which do not run here: the 4-bit products "
                   "keep float activations")
    return LoadedModel(model, tokenizer, config, load_generation_defaults(model_dir), model_dir)


def load_reference(reference: str | None, dtype: str = "auto", device: str = "auto", quantize: str | None = None,
                   compile_step: bool = False, int8_activations: bool = False) -> LoadedModel:
    """A model reference as the user gives it (folder, hub repo id, name from `localgpt list`, None for the
    default model) → a LoadedModel ready to generate, downloading it first if need be; compile_step compiles the
    decode step (localgpt.compiled, which says so first)."""
    from localgpt.hub import resolve

    folder = resolve(reference)
    interrupts.marker("loading")
    loaded = load_model(folder, dtype=dtype, device=device, quantize=quantize, int8_activations=int8_activations)
    if compile_step:
        from localgpt.compiled import compile_decode

        compile_decode(loaded.model)
    freeze_heap()
    return loaded


def freeze_heap() -> None:
    """For a process that loaded its model and now decodes: what loading made (modules, tokenizer tables) lives as
    long as the process, so it leaves the collector's generations. Python's full collections otherwise walk all of
    it while tokens are decoded: 3% of a 4-bit SmolLM2 decoding profile, and 5-7% faster greedy decoding frozen."""
    gc.collect()
    gc.freeze()
