"""The native decoding kernels (localgpt/kernels.c via localgpt/native.py): each against torch's own op on shapes
with tails, strided views and grouped heads; whole models with them against the same models without them; the
build (once, atomic, cached by what it was built from) and every way of falling back to torch."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers import run_cli, tiny_model
from localgpt import native
from localgpt.backends.base import rebuilt_as
from localgpt.backends.native import NativeAttention, NativeBlock, NativeLinear, NativeMLP, NativeRMSNorm
from localgpt.backends.native import install as install_native
from localgpt.families import load_config
from localgpt.model import MLP, Attention, Block, RMSNorm
from localgpt.weights import load_weights

CAN_RUN = native.isa_for(native.cpu_flags()) is not None and native.find_compiler() is not None \
    and os.environ.get("LOCALGPT_NATIVE", "1") != "0"
needs_native = pytest.mark.skipif(not CAN_RUN, reason="no AVX-512 or AVX2+FMA, or no C compiler: torch's ops are used")
DTYPES = [torch.float32, torch.bfloat16]
NO_SIMD = "avx512f,avx2"  # for LOCALGPT_CPU_FLAGS_MASK: a CPU kernels.c has no code for


@pytest.mark.skipif(native.find_compiler() is None or platform.machine() != "x86_64", reason="no x86-64 C compiler")
@pytest.mark.parametrize("isa", sorted(native.ISA_BUILDS))
def test_kernels_compile_for_every_instruction_set_they_claim(tmp_path, isa):
    """On any x86-64 host, AVX-512 or not: kernels.c builds with exactly the flags the run-time gate checks (a
    use of any other extension breaks this build), and the bfloat16 build has its bfloat16 products."""
    flags = [*native.ISA_BUILDS[isa], "-O2", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]
    library = tmp_path / f"kernels-{isa}.so"
    result = subprocess.run([native.find_compiler(), *flags, str(native.SOURCE), "-o", str(library)],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    symbols = subprocess.run(["nm", "-D", "--defined-only", str(library)], capture_output=True, text=True).stdout
    for kernel in ("linear", "attention", "rope_write", "rms_norm", "silu_mul", "decoder_block", "linear_q8",
                   "linear_q4", "linear_q4i8", "dequantize_q8", "dequantize_q4"):
        assert f"lg_{kernel}_f32" in symbols and f"lg_{kernel}_bf16" in symbols, kernel


CHECK_SOURCE = Path(__file__).with_name("native_check.c")
CHECK_FLAGS = ["-O2", "-fopenmp", "-ffp-contract=off", f"-I{native.SOURCE.parent}", str(CHECK_SOURCE), "-lm"]
RUNS_ON = {"avx2": native.ISA_FLAGS["avx2"], "avx512": native.ISA_FLAGS["avx512"],
           "avx512-bf16": native.ISA_FLAGS["avx512"] | {native.BF16_FLAG},
           "avx512-vnni": native.ISA_FLAGS["avx512"] | {"avx512_vnni"}}


@pytest.mark.skipif(native.find_compiler() is None or platform.machine() != "x86_64", reason="no x86-64 C compiler")
@pytest.mark.parametrize("isa", sorted(native.ISA_BUILDS))
def test_every_kernel_passes_its_c_checks_in_each_x86_build_this_cpu_runs(tmp_path, isa):
    """tests/native_check.c holds every kernel to double-precision references (tails, grouped heads, soft-caps,
    the whole layer bit-equal to its parts), compiled for exactly one instruction set."""
    if not RUNS_ON[isa] <= native.cpu_flags():
        pytest.skip(f"this CPU cannot run the {isa} build (it is still compiled by the test above)")
    check = tmp_path / f"check-{isa}"
    built = subprocess.run([native.find_compiler(), *native.ISA_BUILDS[isa], *CHECK_FLAGS, "-o", str(check)],
                           capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr
    result = subprocess.run([str(check)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and f"native_check {isa.split('-')[0]}:" in result.stdout, result.stdout[-2000:]


def test_the_neon_build_passes_its_c_checks_under_qemu(tmp_path):
    """ARM: the aarch64 cross compiler (Debian's gcc-aarch64-linux-gnu) builds the NEON layer, and qemu-user runs
    the same C checks. CI installs both and sets LOCALGPT_REQUIRE_CROSS=1, so there this cannot skip."""
    compiler, emulator = shutil.which("aarch64-linux-gnu-gcc"), shutil.which("qemu-aarch64")
    if compiler is None or emulator is None:
        if os.environ.get("LOCALGPT_REQUIRE_CROSS") == "1":
            pytest.fail("aarch64-linux-gnu-gcc and qemu-aarch64 are required here (apt-get install "
                        "gcc-aarch64-linux-gnu qemu-user)")
        pytest.skip("no aarch64 cross compiler or qemu-aarch64 (apt-get install gcc-aarch64-linux-gnu qemu-user)")
    # the base build, and one with the dot-product extension (sdot) that the int8-activation products use
    for name, build in (("neon", native.NEON_BUILD), ("neon-dotprod", ["-march=armv8.2-a+dotprod"])):
        check = tmp_path / f"check-{name}"
        built = subprocess.run([compiler, *build, "-static", *CHECK_FLAGS, "-o", str(check)],
                               capture_output=True, text=True, timeout=300)
        assert built.returncode == 0, built.stderr
        result = subprocess.run([emulator, str(check)], capture_output=True, text=True, timeout=600)
        assert result.returncode == 0 and "native_check neon:" in result.stdout, (name, result.stdout[-2000:])


@needs_native
def test_kernels_load_wherever_they_can_run():
    """On a machine with AVX-512 or AVX2 and a compiler, a broken kernels.c must fail here, not fall back quietly;
    the build that runs is the best this CPU has, with vdpbf16ps exactly where the CPU has AVX512-BF16."""
    assert native.library() is not None
    assert native.isa() == native.isa_for(native.cpu_flags())
    expected_dot = native.isa() == "avx512" and native.BF16_FLAG in native.cpu_flags()
    assert bool(native.library().lg_has_bf16_dot()) == expected_dot


def test_masked_flags_reproduce_a_cpu_without_them():
    """LOCALGPT_CPU_FLAGS_MASK hides flags from the gate and from -march=native, on any machine."""
    script = "from localgpt import native; print(native.isa(), native.compile_flags()[-1])"
    assert run_python(script, LOCALGPT_CPU_FLAGS_MASK=NO_SIMD).stdout.split() == ["None", "-mno-avx512f"]
    if CAN_RUN and "avx2" in native.cpu_flags() and "fma" in native.cpu_flags():
        avx2 = run_python(script, LOCALGPT_CPU_FLAGS_MASK="avx512f")
        assert avx2.stdout.split() == ["avx2", "-mno-avx512f"], avx2.stderr


@pytest.mark.skipif(not (CAN_RUN and native.isa() == "avx512"), reason="the main run already uses the AVX2 build")
def test_the_avx2_build_passes_the_kernel_tests_too():
    """On an AVX-512 host the AVX2 build runs as well (these CPUs have AVX2): the kernel, whole-model and
    whole-layer tests of this file, again, with AVX-512 hidden."""
    tests = "matches or decoding_steps or rotary_step or whole_layer or loads_wherever or bf16_dot"
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", tests],
                            capture_output=True, text=True, timeout=900,
                            env={**os.environ, "LOCALGPT_CPU_FLAGS_MASK": "avx512f"})
    assert result.returncode == 0, result.stdout[-3000:]
    assert " passed" in result.stdout and " skipped" not in result.stdout.splitlines()[-1], result.stdout[-500:]


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inner,outer", [(1, 576, 960), (4, 1536, 576), (3, 37, 5), (2, 100, 33),
                                               (5, 64, 7), (16, 72, 130), (1, 16, 1)])
def test_linear_matches_torch(dtype, rows, inner, outer):
    generator = torch.Generator().manual_seed(rows * inner + outer)
    x = torch.randn(rows, inner, generator=generator).to(dtype)
    weight = torch.randn(outer, inner, generator=generator).to(dtype)
    assert native.supports(weight)
    actual, expected = native.linear(x, weight), F.linear(x, weight)
    assert actual.dtype == dtype and actual.shape == (rows, outer)
    if dtype == torch.float32:  # as close to the exact sums as MKL's own (another order of the same additions)
        exact = x.double() @ weight.double().t()
        assert (actual - exact).abs().max() <= 4 * (expected - exact).abs().max() + 1e-6
    else:  # float32 sums of exact products: at most the last bfloat16 bit differs, and rarely
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2)
        assert (actual == expected).float().mean() > 0.9


@needs_native
def test_linear_refuses_what_it_cannot_read():
    weight = torch.randn(8, 16)
    assert not native.supports(weight.t())  # not contiguous
    assert not native.supports(weight.half())
    assert not native.supports(weight[None])


def sdpa_reference(q, keys, values, scale, softcap):
    """transformers' definition, in float64: (B, h, 1, hd) against (B, g, S, hd)."""
    B, h, _, hd = q.shape
    g = keys.shape[1]
    q = q.double().reshape(B, g, h // g, hd)
    scores = q @ keys.double().transpose(-1, -2) * scale
    if softcap:
        scores = torch.tanh(scores / softcap) * softcap
    return (torch.softmax(scores, dim=-1) @ values.double()).reshape(B, h, 1, hd)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B,h,g,S,hd,softcap", [(1, 9, 3, 200, 64, None), (4, 4, 2, 7, 24, None),
                                                 (2, 8, 8, 33, 256, 50.0), (1, 2, 1, 1, 16, None),
                                                 (3, 6, 2, 1000, 80, None), (1, 4, 4, 70, 18, 30.0)])
def test_attention_matches_reference(dtype, B, h, g, S, hd, softcap):
    generator = torch.Generator().manual_seed(S + hd)
    qk = torch.randn(B, 1, h + g, hd, generator=generator).to(dtype)
    q = qk[:, :, :h].transpose(1, 2)  # a strided view, as the model passes it
    cache = torch.randn(2, B, g, S + 10, hd, generator=generator).to(dtype)
    keys, values = cache[0, :, :, 3 : S + 3], cache[1, :, :, 3 : S + 3]  # views into a longer cache
    scale = hd**-0.5
    actual = native.attention(q, keys, values, scale, softcap)
    expected = sdpa_reference(q, keys, values, scale, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(actual.double(), expected, rtol=tolerance, atol=tolerance)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("h,g,hd,softcap", [(9, 3, 64, None), (4, 4, 80, 30.0), (2, 1, 128, None)])
def test_attention_rows_at_their_own_positions(dtype, h, g, hd, softcap):
    """Rows (as beams or a batch) read their own stretch of the cache: lengths that end inside, on and just past
    the kernel's 256-position spans, and rows far shorter than the longest (whose later spans are empty)."""
    firsts = torch.tensor([0, 5, 300, 40, 0, 2], dtype=torch.int64)
    counts = torch.tensor([700, 1, 256, 513, 257, 30], dtype=torch.int64)
    B = len(counts)
    generator = torch.Generator().manual_seed(h * hd)
    q = torch.randn(B, h, 1, hd, generator=generator).to(dtype)
    cache = (torch.randn(2, B, g, 800, hd, generator=generator) * 2).to(dtype)
    scale = hd**-0.5
    actual = native.attention_rows(q, cache[0], cache[1], firsts, counts, scale, softcap)
    tolerance = 1e-5 if dtype == torch.float32 else 2e-2
    for b, (first, count) in enumerate(zip(firsts.tolist(), counts.tolist(), strict=True)):
        stretch = slice(first, first + count)
        expected = sdpa_reference(q[b : b + 1], cache[0, b : b + 1, :, stretch], cache[1, b : b + 1, :, stretch],
                                  scale, softcap)
        torch.testing.assert_close(actual[b : b + 1].double(), expected, rtol=tolerance, atol=tolerance)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1, 3072), (4, 1, 70), (2, 3, 32)])
def test_silu_mul_matches_torch(dtype, shape):
    gate_up = (torch.randn(shape, generator=torch.Generator().manual_seed(2)) * 4).to(dtype)
    gate_up[..., 0] = -100.0  # e^100 overflows: silu is -0
    gate, up = gate_up.chunk(2, dim=-1)
    expected = F.silu(gate) * up  # torch's two ops, each rounded to the dtype
    actual = native.silu_mul(gate_up)
    if dtype == torch.bfloat16:  # a different exp can move a float32 result across a rounding boundary, rarely
        torch.testing.assert_close(actual.float(), expected.float(), rtol=1e-2, atol=1e-2)
        assert (actual == expected).float().mean() > 0.97
    else:
        torch.testing.assert_close(actual, expected, rtol=1e-6, atol=1e-6)


@needs_native
def test_bfloat16_stores_round_as_torch_does():
    """The kernels' vector bfloat16 store (whole vectors) against torch's rounding, value for value: ties to even,
    denormals, the largest finite values, infinities and NaN. silu(100) is exactly 100, so silu_mul writes
    round(100 · up)."""
    specials = torch.tensor([1.0e-40, -3.0e-39, 3.3895e38, -3.3895e38, float("inf"), float("-inf"), float("nan"),
                             0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 2**-126, 7.0e-45])
    up = torch.cat([specials / 100, torch.randn(128 - len(specials), generator=torch.Generator().manual_seed(5))])
    up = up.bfloat16()
    gate_up = torch.cat([torch.full((128,), 100.0).bfloat16(), up]).view(1, 1, 256)
    actual = native.silu_mul(gate_up).view(-1)
    expected = (torch.full((128,), 100.0) * up.float()).bfloat16()
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(actual[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])  # Llama's w, Gemma's (1 + w)
@pytest.mark.parametrize("shape", [(1, 1, 576), (3, 5, 37), (2, 2304)])
def test_rms_norm_matches_torch(dtype, offset, shape):
    generator = torch.Generator().manual_seed(shape[-1])
    norm = RMSNorm(shape[-1], 1e-6, offset)
    norm.weight.data = torch.randn(shape[-1], generator=generator) * 0.5 + 1
    norm = norm.to(dtype)
    x = (torch.randn(shape, generator=generator) * 3).to(dtype)
    expected = norm(x).detach()  # the torch path
    actual = native.rms_norm(x, norm.weight, norm.eps, offset)
    if dtype == torch.bfloat16:  # rounded where transformers rounds; the float32 sum of squares is added in
        # another order, which moves a value across a bfloat16 rounding boundary only rarely, by one step
        assert (actual == expected).float().mean() > 0.99
        torch.testing.assert_close(actual, expected, rtol=2**-7, atol=0)
    else:
        torch.testing.assert_close(actual, expected, rtol=2e-6, atol=2e-6)


TORCH_CLASSES = {NativeBlock: Block, NativeAttention: Attention, NativeMLP: MLP, NativeRMSNorm: RMSNorm}


def back_to_torch(model, *classes) -> None:
    """Turn the native backend's modules of these classes back into the model's own (torch) ones, keeping the
    rest: a model that differs from its twin in exactly one path."""
    for name, module in list(model.named_modules()):
        if type(module) in classes:
            model.set_submodule(name, rebuilt_as(module, TORCH_CLASSES[type(module)]))


def cache_contents(cache) -> tuple[torch.Tensor, torch.Tensor]:
    """Every layer's filled slots (in slot order: a ring layer's wrap the same way on both sides), keys and values."""
    keys = torch.cat([layer.keys[:, :, layer.filled()].flatten(1) for layer in cache.layers], dim=1)
    values = torch.cat([layer.values[:, :, layer.filled()].flatten(1) for layer in cache.layers], dim=1)
    return keys.clone(), values.clone()


def load(folder, dtype, backend="native"):
    return load_weights(folder, load_config(folder), dtype, torch.device("cpu"), backend=backend)


@needs_native
@pytest.mark.parametrize("variant", ["llama", "gpt2", "gemma2", "qwen3", "qwen2", "smollm3", "gemma3"])
@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_decoding_steps_match_torch_paths(tmp_path, variant, dtype):
    """Prefill, then one-token steps for 3 rows at once (as beams): logits and every cache entry the steps wrote
    agree with the same model on torch's ops (rotary step, sliding windows, soft-capping, learned positions,
    per-head norms, biases)."""
    tiny_model(tmp_path, variant)
    native_model, torch_model = load(tmp_path, dtype, "native"), load(tmp_path, dtype, "torch")
    assert all(isinstance(m, (NativeRMSNorm, NativeAttention)) for m in native_model.modules()
               if isinstance(m, (RMSNorm, Attention)))
    assert native_model.backend.name == "native" and torch_model.backend.name == "torch"
    ids = torch.randint(3, 500, (3, 20), generator=torch.Generator().manual_seed(0))
    runs = []
    for model in (native_model, torch_model):
        cache = model.make_cache(3, 32)
        logits = [model(ids[:, :12], cache, 0, last_only=False)]
        logits += [model(ids[:, i : i + 1], cache) for i in range(12, 20)]
        runs.append((torch.cat(logits, dim=1).float(), *cache_contents(cache)))
    (logits, keys, values), (expected_logits, expected_keys, expected_values) = runs
    if dtype == torch.float32:
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(keys, expected_keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(values, expected_values, rtol=1e-5, atol=1e-5)
    else:  # bfloat16's own rounding noise, as between transformers and us (test_parity's bound)
        assert (logits - expected_logits).abs().max() < 0.05 * expected_logits.abs().max()


@needs_native
@torch.no_grad()
def test_rotary_step_writes_the_same_bits_as_torch(tmp_path):
    """bfloat16 rounds after each product and after the sum, as torch does: the first decoding step's keys are
    bit-equal (later steps differ through the attention's own rounding, not the rotation)."""
    tiny_model(tmp_path, "llama")
    native_attention, torch_attention = load(tmp_path, torch.bfloat16), load(tmp_path, torch.bfloat16)
    back_to_torch(native_attention, NativeBlock, NativeRMSNorm)  # the same inputs to the projection on both sides
    back_to_torch(torch_attention, NativeBlock, NativeRMSNorm, NativeAttention, NativeMLP)
    assert isinstance(native_attention.layers[0].attn, NativeAttention)
    assert type(torch_attention.layers[0].attn) is Attention
    ids = torch.randint(3, 500, (2, 13), generator=torch.Generator().manual_seed(3))
    caches = []
    for model in (native_attention, torch_attention):
        cache = model.make_cache(2, 16)
        model(ids[:, :12], cache, 0)
        model(ids[:, 12:], cache)
        caches.append(cache)
    first_layers = [cache.layers[0] for cache in caches]
    assert torch.equal(first_layers[0].keys[:, :, 12], first_layers[1].keys[:, :, 12])  # the first layer's new keys
    assert torch.equal(first_layers[0].values[:, :, 12], first_layers[1].values[:, :, 12])


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, **env})


@needs_native
@pytest.mark.parametrize("switch", [{"LOCALGPT_NATIVE": "0"}, {"LOCALGPT_CPU_FLAGS_MASK": NO_SIMD}])
def test_off_switch_and_a_cpu_without_simd_keep_torch_ops(tmp_path, switch):
    """Where the kernels run, the switch (or a CPU with neither AVX-512 nor AVX2, reproduced by the mask) gives
    torch's ops."""
    tiny_model(tmp_path, "llama")
    script = ("import torch; from localgpt.weights import load_weights; from localgpt.families import load_config; "
              "from localgpt import native; from localgpt.model import Linear; from pathlib import Path; "
              f"m = load_weights(Path({str(tmp_path)!r}), load_config(Path({str(tmp_path)!r})), torch.float32, "
              "torch.device('cpu')); print(native.library() is None, m.backend.name, "
              "any(x.product_kind == 'native' for x in m.modules() if isinstance(x, Linear)))")
    assert run_python(script).stdout.split() == ["False", "native", "True"]  # without the switch
    result = run_python(script, **switch)
    assert result.stdout.split() == ["True", "torch", "False"], result.stderr


@needs_native
def test_without_avx512_bf16_bfloat16_products_are_widened_to_float32():
    """A CPU without AVX512-BF16 (reproduced by the mask) still has bfloat16 kernels, without vdpbf16ps: the
    products widen bfloat16 to float32 in registers and give torch's answer."""
    script = ("import torch, torch.nn.functional as F; from localgpt import native; "
              "g = torch.Generator().manual_seed(0); x = torch.randn(3, 200, generator=g).bfloat16(); "
              "w = torch.randn(70, 200, generator=g).bfloat16(); y = native.linear(x, w); "
              "print(native.library().lg_has_bf16_dot(), native.supports(w), "
              "(y.float() - F.linear(x, w).float()).abs().max().item() < 0.1, "
              "(y == F.linear(x, w)).float().mean().item() > 0.9)")
    result = run_python(script, LOCALGPT_CPU_FLAGS_MASK=native.BF16_FLAG)
    assert result.stdout.split() == ["0", "True", "True", "True"] and result.stderr == "", result.stderr


@pytest.mark.parametrize("vendor,flags,expected", [
    ("AuthenticAMD", set(), torch.float32), ("AuthenticAMD", {"avx2", "fma"}, torch.float32),
    ("AuthenticAMD", {"avx512_bf16"}, torch.bfloat16), ("GenuineIntel", {"avx512_bf16"}, torch.float32),
    ("GenuineIntel", {"avx512_bf16", "amx_bf16"}, torch.bfloat16), ("", {"asimd"}, torch.float32)])
def test_bfloat16_prompts_widen_to_float32_where_that_is_the_faster_product(monkeypatch, vendor, flags, expected):
    """A bfloat16 layer's prompt (more rows than decoding takes) is torch's float32 product of the widened weight,
    rounded once, unless torch's bfloat16 matmul is the faster one: AMX tiles, or AVX512-BF16 on AMD (a Xeon with
    AVX512-BF16 and no AMX ran it at 0.6x float32; AVX2 has no bfloat16 dot product at all)."""
    from localgpt.backends import native as native_backend

    monkeypatch.setattr(native, "cpu_flags", lambda: flags)
    monkeypatch.setattr(native, "cpu_vendor", lambda: vendor)
    assert native_backend.prompt_dtype(torch.bfloat16) == expected
    assert native_backend.prompt_dtype(torch.float32) == torch.float32
    layer = rebuilt_as(torch.nn.Linear(96, 40).bfloat16(), NativeLinear)
    layer.prompt_dtype = native_backend.prompt_dtype(torch.bfloat16)
    x = torch.randn(2, 30, 96).bfloat16()
    y = layer(x)
    widened = F.linear(x.float(), layer.weight.float(), layer.bias.float()).bfloat16()
    assert y.dtype == torch.bfloat16 and torch.equal(y, widened if expected == torch.float32
                                                     else F.linear(x, layer.weight, layer.bias))


@pytest.mark.parametrize("vendor,flags,onednn", [
    ("AuthenticAMD", {"avx2", "fma", "avx512f"}, True), ("AuthenticAMD", {"avx2", "fma"}, True),
    ("AuthenticAMD", {"sse4_2"}, False), ("GenuineIntel", {"avx2", "fma", "avx512f"}, False),
    ("", {"asimd"}, False)])
def test_float32_prompts_multiply_through_onednn_where_mkl_takes_its_avx2_path(monkeypatch, vendor, flags, onednn):
    """A float32 prompt's products run through oneDNN's matmul on AMD CPUs (MKL's sgemm runs its AVX2 code there,
    at half oneDNN's speed with AVX-512), F.linear elsewhere; either way y is float32 x Wᵀ + b, summed in the
    library's order."""
    from localgpt.backends import native as native_backend

    monkeypatch.setattr(native, "cpu_flags", lambda: flags)
    monkeypatch.setattr(native, "cpu_vendor", lambda: vendor)
    chosen = native_backend.prompt_product(torch.float32)
    assert (chosen is native_backend.onednn_linear) == (onednn and torch.backends.mkldnn.is_available())
    assert native_backend.prompt_product(torch.bfloat16) is F.linear
    layer = rebuilt_as(torch.nn.Linear(96, 40), NativeLinear)
    layer.prompt_dtype, layer.prompt_product = torch.float32, native_backend.onednn_linear
    x = torch.randn(2, 30, 96)
    y = layer(x)
    assert y.shape == (2, 30, 40) and y.dtype == torch.float32
    torch.testing.assert_close(y, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
    strided = x.transpose(0, 1)  # rows that are not contiguous
    torch.testing.assert_close(layer(strided), F.linear(strided, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


@needs_native
def test_build_is_cached_atomic_and_keyed_by_its_inputs(tmp_path):
    compiler, flags = native.find_compiler(), native.cpu_flags()
    first = native.build(compiler, flags, tmp_path)
    modified = first.stat().st_mtime_ns
    assert native.build(compiler, flags, tmp_path) == first  # cached: not built again
    assert first.stat().st_mtime_ns == modified
    assert native.build(compiler, flags | {"made_up_flag"}, tmp_path) != first  # a new CPU rebuilds
    assert sorted(p.name.startswith("kernels-") for p in tmp_path.iterdir()) == [True, True]  # no scratch left


@needs_native
def test_a_failing_compiler_falls_back_with_one_notice(tmp_path):
    result = run_python("from localgpt import native; print(native.library() is None)", CC="/bin/false",
                        LOCALGPT_HOME=str(tmp_path / "home"))
    assert result.stdout.strip() == "True"
    assert result.stderr.count("native kernels unavailable") == 1 and "Traceback" not in result.stderr


@needs_native
def test_an_unwritable_home_still_gets_kernels(tmp_path):
    (tmp_path / "file").write_text("")  # a home below a file: unwritable for every user, root included
    result = run_python("from localgpt import native; print(native.library() is not None)",
                        LOCALGPT_HOME=str(tmp_path / "file" / "home"))
    assert result.stdout.strip() == "True" and result.stderr == "", result.stderr


@needs_native
@pytest.mark.parametrize("variant", ["llama", "llama-bias", "mistral-window", "qwen2", "llama-untied-mha",
                                     "smollm3"])
@pytest.mark.parametrize("dtype", DTYPES)
@torch.no_grad()
def test_whole_layer_kernel_gives_the_per_op_bits(tmp_path, variant, dtype):
    """lg_decoder_block composes the same kernels in the same order as the per-op native path: every logit and
    cache entry is bit-equal (sliding windows, biases, full multi-head attention, 3 rows as beams)."""
    tiny_model(tmp_path, variant)
    whole, per_op = load(tmp_path, dtype, None), load(tmp_path, dtype, None)
    install_native(whole)
    install_native(per_op, whole_layers=False)
    assert all(isinstance(layer, NativeBlock) for layer in whole.layers)
    assert not any(isinstance(layer, NativeBlock) for layer in per_op.layers)
    ids = torch.randint(3, 500, (3, 20), generator=torch.Generator().manual_seed(0))
    runs = []
    for model in (whole, per_op):
        cache = model.make_cache(3, 32)
        model(ids[:, :12], cache, 0)
        logits = torch.cat([model(ids[:, i : i + 1], cache) for i in range(12, 20)], dim=1)
        runs.append((logits, *cache_contents(cache)))
    for whole, per_op in zip(*runs, strict=True):
        assert torch.equal(whole, per_op)


@needs_native
def test_layers_without_a_native_path_keep_torch_ops(tmp_path):
    for variant in ("gpt2", "gemma2", "qwen3", "gemma"):  # LayerNorm; sandwich norms; q/k norms; GELU
        folder = tmp_path / variant
        folder.mkdir()
        tiny_model(folder, variant)
        model = load(folder, torch.float32)
        assert not any(isinstance(layer, NativeBlock) for layer in model.layers), variant
        assert model.backend.layers == {"per op": len(model.layers)}


def test_cli_answers_the_same_with_and_without_kernels(tmp_path):
    """Through the real CLI: the kernels (where this CPU runs them), LOCALGPT_NATIVE=0, an AVX2-only CPU and one
    with neither (masked) and a compiler that fails all give the same greedy answer (float32 on a tiny model: the
    same tokens).
    Only the failing compiler says anything, in one notice, and only where the kernels would otherwise run."""
    tiny_model(tmp_path, "llama", tokenizer=True, eos_token_id=None)
    answers = {}
    runs = {"native": {}, "failing compiler": {"CC": "/bin/false"}, "off": {"LOCALGPT_NATIVE": "0"},
            "avx2": {"LOCALGPT_CPU_FLAGS_MASK": "avx512f"}, "no simd": {"LOCALGPT_CPU_FLAGS_MASK": NO_SIMD}}
    for name, env in runs.items():
        result = run_cli("generate", "-m", str(tmp_path), "Hello", "-t", "0", "-n", "12",
                         env={**env, "LOCALGPT_HOME": str(tmp_path / f"home-{len(answers)}")})
        assert result.returncode == 0, result.stderr
        answers[name] = (result.stdout, result.stderr)
    assert len({stdout for stdout, _ in answers.values()}) == 1, answers
    assert answers["native"][1] == answers["off"][1] == answers["avx2"][1] == answers["no simd"][1] == ""
    notice = answers["failing compiler"][1]
    if CAN_RUN:
        assert notice.count("native kernels unavailable") == 1 and len(notice.splitlines()) == 1
    else:  # no kernels to build on this CPU: the compiler is never asked, so there is nothing to say
        assert notice == ""


def test_the_wheel_carries_the_kernel_source(tmp_path):
    """A non-editable install must ship kernels.c, or every user would silently get torch's ops."""
    root, project = Path(native.__file__).resolve().parent.parent, tmp_path / "project"
    # a copy: building in the work tree would leave build/ there, and a stale build/ would hide a missing file
    shutil.copytree(root / "localgpt", project / "localgpt", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, project / name)
    # built as `pip install` builds it (an isolated environment with pyproject's setuptools, as .ci/run does)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(project), "-w",
                             str(tmp_path / "wheels")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (wheel,) = (tmp_path / "wheels").glob("localgpt_cli-*.whl")
    assert "localgpt/kernels.c" in zipfile.ZipFile(wheel).namelist()


@needs_native
def test_heads_wider_than_the_attention_kernel_keep_torch_attention(tmp_path, monkeypatch):
    monkeypatch.setattr(native, "MAX_HEAD_DIM", 8)  # tiny llama's heads are 16 wide
    tiny_model(tmp_path, "llama")
    model = load(tmp_path, torch.float32)
    assert not any(isinstance(layer.attn, NativeAttention) for layer in model.layers)
    assert all(isinstance(layer.attn.qkv_proj, NativeLinear) for layer in model.layers)  # products stay native
    assert not any(isinstance(layer, NativeBlock) for layer in model.layers)  # it needs native attention
