"""The native backend's quantized products (kernels.c's lg_linear_q8 / lg_linear_q4 through NativeQuantizedLinear):
held to bitsandbytes' own dequantize-then-matmul, product by product and on whole models, for 8-bit, nf4, fp4 and
double-quantized checkpoints, float32 and bfloat16 activations, decoding rows and prompts; and the quantized head.
(The torch backend, where bitsandbytes' modules multiply, is held to transformers in test_quantize.py.)"""

from __future__ import annotations

import json
import logging

import pytest
import torch

from helpers import assert_clean_error, run_cli, stored_weight, tiny_model
from localgpt import native
from localgpt.backends.native import NativeBlock, NativeQuantizedLinear, native_quantized
from localgpt.checkpoint import read_safetensors_header
from localgpt.families import load_config
from localgpt.quantize import QuantizedWeight, QuantSpec, load_bitsandbytes, make_module, module_weight, parse_spec
from localgpt.weights import load_weights

pytest.importorskip("bitsandbytes")
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
CAN_RUN = native.library() is not None
pytestmark = pytest.mark.skipif(not CAN_RUN, reason="no native kernels here: bitsandbytes' modules run")
CPU = torch.device("cpu")
FORMATS = ["8", "nf4", "fp4", "nf4-double", "fp4-double"]
# K: 64 and 576 end with a 64-value tail on AVX-512 (its groups are 128), 128 and 1536 are whole groups everywhere
SHAPES = [(5, 64), (33, 576), (40, 1536), (7, 128), (1, 192)]


@pytest.fixture(scope="module")
def bnb():
    return load_bitsandbytes(CPU)


@pytest.mark.parametrize("form", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_products_match_bitsandbytes_dequantize_then_matmul(bnb, form, dtype):
    """Decoding rows (1-5, the kernels' row blocks and a remainder) and a prompt's rows (17, the dequantized
    weight and torch's product), with and without a bias, against x · dequantize(W)ᵀ in float32."""
    torch.manual_seed(0)
    for N, K in SHAPES:
        stored, dequantized = stored_weight(torch.randn(N, K), form, bnb)
        bias = torch.randn(N).to(dtype)
        spec = QuantSpec(bits=stored.bits, quant_type=stored.quant_type or "nf4", compute_dtype=dtype)
        layer = native_quantized(make_module(stored, bias, spec, bnb, CPU), dtype)
        assert isinstance(layer, NativeQuantizedLinear)
        for M in (1, 2, 3, 4, 5, 9, 17):
            x = torch.randn(2, M, K).to(dtype)
            expected = x.float() @ dequantized.T + bias.float()
            got = layer(x)
            assert got.dtype == dtype and got.shape == (2, M, N)
            size = x.float().abs() @ dequantized.abs().T + bias.float().abs()
            if dtype == torch.float32:
                assert ((got - expected).abs() <= 1e-5 * size + 1e-6).all(), (form, N, K, M)
            else:  # bfloat16 rounding of the output (and, for prompts, of the dequantized weight)
                assert ((got.float() - expected).abs() <= 2 ** -7 * size + 1e-3).all(), (form, N, K, M)


@pytest.mark.parametrize("form", ["8", "nf4"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_decode_together_as_they_decode_alone(bnb, form, dtype):
    """A row's product does not depend on the rows beside it: beam search and batched decoding give each row what
    greedy decoding of that row alone gives. The kernels take 2-4 rows of x per pass and pair weight rows (odd N:
    the last one alone), so this covers every row count and a pass that ends with a lone row (M = 5)."""
    torch.manual_seed(0)
    stored, _ = stored_weight(torch.randn(37, 576), form, bnb)
    for M in (2, 3, 4, 5):
        x = torch.randn(M, 576).to(dtype)
        together = native.quantized_linear(x, stored)
        alone = torch.cat([native.quantized_linear(x[m : m + 1], stored) for m in range(M)])
        assert torch.equal(together, alone), (form, dtype, M)


@pytest.mark.parametrize("form", FORMATS)
def test_dequantize_is_bitsandbytes_value_for_value(bnb, form):
    stored, dequantized = stored_weight(torch.randn(48, 576), form, bnb)
    assert torch.equal(native.dequantize(stored, torch.float32), dequantized)
    assert torch.equal(native.dequantize(stored, torch.bfloat16), dequantized.bfloat16())


def test_layers_the_kernels_cannot_run_keep_bitsandbytes(bnb):
    """float16 activations, and 4-bit rows that are not whole 64-value blocks, stay bitsandbytes' modules."""
    stored, _ = stored_weight(torch.randn(8, 128), "nf4", bnb)
    module = make_module(stored, None, QuantSpec(bits=4, compute_dtype=torch.float16), bnb, CPU)
    assert native_quantized(module, torch.float16) is None
    ragged = QuantizedWeight(4, (2, 96), stored.data[:96], stored.scale[:3], stored.code, "nf4")
    assert not native.supports_quantized(ragged, torch.float32)


def dequantized_twin(folder, spec: QuantSpec):
    """The same quantized model with every quantized layer replaced by a float Linear holding bitsandbytes'
    dequantized weight: the reference the native model must equal."""
    model = load_weights(folder, load_config(folder), spec.compute_dtype, CPU, quantize=spec, backend=None)
    for name, module in [(n, m) for n, m in model.named_modules() if hasattr(m, "localgpt_bits")]:
        weight = native.dequantize(module_weight(module), torch.float32)
        linear = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        linear.weight.data = weight
        if module.bias is not None:
            linear.bias.data = module.bias.data.float()
        model.set_submodule(name, linear)
    return model.float()


def decode_logits(model, prompt: torch.Tensor, steps: int = 6) -> torch.Tensor:
    """A prompt, then one-token steps (the decoding kernels): the logits of every step (steps, vocab)."""
    with torch.no_grad():
        cache = model.make_cache(prompt.shape[0], prompt.shape[1] + steps + 1)
        out = [model(prompt, cache)[:, -1].float()]
        for _ in range(steps):
            token = out[-1].argmax(-1, keepdim=True)
            out.append(model(token, cache)[:, -1].float())
    return torch.stack(out, 1)


@pytest.mark.parametrize("variant", ["llama", "llama-bias", "qwen2", "phi3", "gemma"])
@pytest.mark.parametrize("flag", ["8", "nf4", "fp4"])
def test_quantized_models_decode_as_their_dequantized_float_twin(tmp_path, variant, flag):
    """Whole models in float32 compute (every layer quantized, the head too): the native backend — one kernel per
    layer where the architecture allows (not Gemma's GELU), per op otherwise — against the float model holding
    bitsandbytes' dequantized weights; the per-op path gives the whole-layer kernel's bits."""
    tiny_model(tmp_path, variant)
    spec = parse_spec(flag, "float32", skip="")
    prompt = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 4, 17, 250]])
    expected = decode_logits(dequantized_twin(tmp_path, spec), prompt)
    model = load_weights(tmp_path, load_config(tmp_path), torch.float32, CPU, quantize=spec)
    kinds = model.backend.products
    assert set(kinds) == {f"native {'8-bit' if flag == '8' else '4-bit ' + flag}"}, model.backend.describe()
    whole = variant != "gemma"
    assert isinstance(model.layers[0], NativeBlock) == whole
    got = decode_logits(model, prompt)
    assert (got - expected).abs().max() < 1e-4
    if whole:
        from localgpt.backends.native import install

        per_op = load_weights(tmp_path, load_config(tmp_path), torch.float32, CPU, quantize=spec, backend=None)
        assert model.weight_bytes() == per_op.weight_bytes()  # the stored bytes, whichever module holds them
        install(per_op, whole_layers=False)
        assert not isinstance(per_op.layers[0], NativeBlock)
        assert torch.equal(decode_logits(per_op, prompt), got)


def test_bfloat16_rows_at_their_own_positions(tmp_path):
    """4-bit in bfloat16 (the CPU default) through the engine's per-row path: each row as it decodes alone."""
    from localgpt.engine import Request, generate_batch
    from localgpt.generate import generate_tokens
    from localgpt.sampling import SamplingOptions

    tiny_model(tmp_path, "llama")
    model = load_weights(tmp_path, load_config(tmp_path), torch.bfloat16, CPU, quantize=parse_spec("nf4"))
    assert any(isinstance(m, NativeQuantizedLinear) for m in model.modules())
    prompts = [[1, 5, 9, 33], [1, 70, 2, 100, 4, 17, 250, 8], [1, 3]]
    greedy = SamplingOptions(temperature=0)
    alone = [list(generate_tokens(model, p, greedy, 8)) for p in prompts]
    together = [[] for _ in prompts]
    for event in generate_batch(model, [Request(p, greedy, 8) for p in prompts]):
        together[event.request].append(event.token)
    assert together == alone


@pytest.mark.parametrize("bits", ["8", "4"])
def test_a_tied_head_quantizes_as_an_untied_copy_and_loads_in_transformers(tmp_path, bits):
    """`quantize --quantize-head` on a tied model: the head is written as its own quantized lm_head (config
    untied), the embedding stays in float, our loader reads it back to the same logits, and transformers loads the
    folder with a bitsandbytes head."""
    from transformers import AutoModelForCausalLM

    tiny_model(tmp_path / "float", "qwen2", tokenizer=True)  # tied
    result = run_cli("quantize", str(tmp_path / "float"), "--bits", bits, "--quantize-head", "--compute-dtype",
                     "float32", "-o", str(tmp_path / "q"))
    assert result.returncode == 0, result.stderr
    header = read_safetensors_header(tmp_path / "q" / "model.safetensors")
    assert header["lm_head.weight"].dtype == ("int8" if bits == "8" else "uint8")
    assert header["model.embed_tokens.weight"].dtype == "float32"
    assert json.loads((tmp_path / "q" / "config.json").read_text())["tie_word_embeddings"] is False
    config = load_config(tmp_path / "q")
    native_model = load_weights(tmp_path / "q", config, torch.float32, CPU)
    assert isinstance(native_model.lm_head, NativeQuantizedLinear)
    prompt = torch.tensor([[1, 5, 9, 33, 70]])
    kept = "q_proj,k_proj,v_proj,qkv_proj" if bits == "4" else ""  # the 4-bit default, less the head
    spec = parse_spec("8" if bits == "8" else "nf4", "float32", skip=kept)
    twin = dequantized_twin(tmp_path / "float", spec)
    assert (decode_logits(native_model, prompt) - decode_logits(twin, prompt)).abs().max() < 1e-4
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.float32).eval()
    assert type(theirs.lm_head).__name__ == ("Linear8bitLt" if bits == "8" else "Linear4bit")
    ours_bnb = load_weights(tmp_path / "q", config, torch.float32, CPU, backend=None)  # bitsandbytes' own head
    with torch.no_grad():
        expected = theirs(prompt).logits[0, -1]
        got = ours_bnb(prompt, ours_bnb.make_cache(1, 8))[0, -1]
    # 8-bit: bitsandbytes rounds the head's inputs to int8, which magnifies last-bit differences in them
    assert (got - expected).abs().max() < (0.05 if bits == "8" else 1e-4)
    assert torch.equal(got.argmax(), expected.argmax())


def int8_activation_product(x: torch.Tensor, stored: QuantizedWeight) -> torch.Tensor:
    """The int8-activation 4-bit product as kernels.c defines it, in torch: x (M, K) rounded per 64-value block
    (scale max |x| / 127, to nearest even), the code to round(127 code), exact integer sums per block in float64,
    each scaled by absmax · scale / 127."""
    M, K = x.shape
    N = stored.shape[0]
    blocks = x.float().reshape(M, K // 64, 64)
    largest = blocks.abs().amax(-1, keepdim=True)
    # a true float32 division, as the kernel's (127.0 / tensor would be a reciprocal times 127: other last bits)
    inverse = torch.where(largest > 0, torch.full_like(largest, 127.0) / largest, torch.zeros_like(largest))
    values = torch.round(blocks * inverse).clamp(-127, 127).double()
    packed = stored.data.reshape(-1)
    nibbles = torch.stack([packed >> 4, packed & 15], -1).reshape(N, K // 64, 64).long()  # first value: high nibble
    weights = torch.round(stored.code.float() * 127).clamp(-127, 127).double()[nibbles]
    sums = torch.einsum("mbk,nbk->mnb", values, weights)
    scales = stored.scale.float().reshape(N, K // 64)[None] * (largest / 127.0).reshape(M, 1, K // 64)
    return (sums * scales.double()).sum(-1) / 127


@pytest.mark.parametrize("form", ["nf4", "fp4", "nf4-double"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_activation_products_are_the_integer_products_they_define(bnb, form, dtype):
    """linear_q4i8 against its definition (int8_activation_product): rows 1-6 and 16 (the row blocks, a
    remainder, the most decoding takes), blocks of zeros, and values at exactly half a step, which round to even;
    and, as a measure of what the opt-in costs, within a few percent of bitsandbytes' float product."""
    torch.manual_seed(0)
    for N, K in SHAPES:
        stored, dequantized = stored_weight(torch.randn(N, K), form, bnb)
        for M in (1, 2, 3, 4, 5, 6, 16):
            x = torch.randn(M, K).to(dtype)
            x[0, :64] = 0
            if K >= 128:
                x[0, 64:66] = torch.tensor([1.25, 0.5 * 1.25 / 127])  # 0.5 · 127 / 1.25 · 1.25 / 127 → 0.5 → 0
            got = native.quantized_linear(x, stored, int8_activations=True)
            assert got.dtype == dtype and got.shape == (M, N)
            expected = int8_activation_product(x, stored)
            size = (x.float().abs() @ dequantized.abs().T).double()
            slack = 2 ** -8 * expected.abs() if dtype == torch.bfloat16 else 0
            assert ((got.double() - expected).abs() <= slack + 1e-6 * size + 1e-6).all(), (form, N, K, M)
            reference = x.float() @ dequantized.T
            assert (got.float() - reference).norm() <= 0.03 * reference.norm(), (form, N, K, M)


def test_int8_activations_switch_whole_layers_and_per_op_alike(tmp_path):
    """use_int8_activations on a 4-bit model: every native 4-bit product says so, the whole-layer kernel and the
    per-op path give the same bits, and the first logits move off the float-activation ones by little."""
    from localgpt.backends import use_int8_activations
    from localgpt.backends.native import install
    from localgpt.backends.native import use_int8_activations as native_int8_activations

    tiny_model(tmp_path, "llama")
    spec = parse_spec("nf4", "float32", skip="")
    prompt = torch.tensor([[1, 5, 9, 33, 70, 2, 100, 4, 17, 250]])
    model = load_weights(tmp_path, load_config(tmp_path), torch.float32, CPU, quantize=spec)
    float_logits = decode_logits(model, prompt)
    assert use_int8_activations(model) == sum(1 for m in model.modules() if isinstance(m, NativeQuantizedLinear))
    assert set(model.backend.products) == {"native 4-bit nf4 · int8 activations"}, model.backend.describe()
    assert isinstance(model.layers[0], NativeBlock)
    got = decode_logits(model, prompt)
    per_op = load_weights(tmp_path, load_config(tmp_path), torch.float32, CPU, quantize=spec, backend=None)
    install(per_op, whole_layers=False)
    assert not isinstance(per_op.layers[0], NativeBlock)
    native_int8_activations(per_op)
    assert torch.equal(decode_logits(per_op, prompt), got)
    assert not torch.equal(got, float_logits)
    first = float_logits[:, 0]  # later steps may pick other tokens: a random model's logits are close
    assert (got[:, 0] - first).abs().max() < 0.05 * first.abs().max()


def test_int8_activations_need_a_4_bit_model(tmp_path):
    """--int8-activations on a float or 8-bit model is refused in one line; on a 4-bit one --stats says it ran."""
    tiny_model(tmp_path, "llama", tokenizer=True)
    for flags, said in (([], "not quantized"), (["-q", "8"], "8-bit")):
        result = run_cli("generate", "hi", "-m", str(tmp_path), "--max-tokens", "2", "--int8-activations", *flags)
        assert_clean_error(result, 2, "--int8-activations is for 4-bit models")
        assert said in result.stderr
    result = run_cli("generate", "hi", "-m", str(tmp_path), "--max-tokens", "2", "-q", "nf4", "--int8-activations",
                     "--stats", "--no-log")
    assert result.returncode == 0, result.stderr
    assert "native 4-bit nf4 · int8 activations" in result.stderr


@pytest.mark.parametrize("vendor,flags,expected_dtype", [("AuthenticAMD", {"avx512_bf16"}, torch.bfloat16),
                                                          ("GenuineIntel", {"avx512_bf16"}, torch.float32)])
def test_bfloat16_4bit_prompts_multiply_in_the_dtype_of_dense_ones(bnb, monkeypatch, vendor, flags, expected_dtype):
    """A bfloat16 4-bit layer's prompt (more rows than decoding takes) is F.linear of the weight dequantized to
    prompt_dtype, the dtype a dense bfloat16 layer's prompt runs in: in bfloat16 that is bitsandbytes' own
    dequantize_4bit then matmul; in float32 it is rounded once to bfloat16."""
    from localgpt.backends.native import prompt_dtype

    monkeypatch.setattr(native, "cpu_flags", lambda: flags)
    monkeypatch.setattr(native, "cpu_vendor", lambda: vendor)
    assert prompt_dtype(torch.float32) == torch.float32
    stored, dequantized = stored_weight(torch.randn(48, 576), "nf4", bnb)
    spec = QuantSpec(bits=4, quant_type="nf4", compute_dtype=torch.bfloat16)
    layer = native_quantized(make_module(stored, None, spec, bnb, CPU), torch.bfloat16)
    assert layer.prompt_dtype == expected_dtype
    x = torch.randn(1, 40, 576).bfloat16()
    weight = native.dequantize(stored, layer.prompt_dtype)
    assert torch.equal(weight, dequantized.to(expected_dtype))  # bitsandbytes' dequantization, rounded once
    expected = torch.nn.functional.linear(x.to(layer.prompt_dtype), weight).bfloat16()
    assert torch.equal(layer(x), expected)
