"""Builders for the tests: tiny tokenizers and tiny random transformers models saved as model folders."""

from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today?",
    "a ,b  c\tde\nnew line\n\nparagraph",
    "def add(a, b):\n    return a + b  # code\n",
    "東京は日本の首都です。北京是中国的首都。",
    "emoji: 😀🎉👍🏽 and ümlauts ñ é",
    "What is the capital of France? Paris is the capital of France.",
    "<|im_start|>user\nHi<|im_end|>",
] * 4

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' "
    "+ '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_level_tokenizer(vocab_size: int = 400):
    """A GPT-2 style byte-level BPE trained on CORPUS (special tokens get ids 0, 1, 2)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


def sentencepiece_tokenizer(vocab_size: int = 400):
    """A Llama/SentencePiece style BPE: ▁ for spaces, byte fallback tokens <0xNN>, a leading-space strip."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tokenizer = Tokenizer(models.BPE(byte_fallback=True, unk_token=None, fuse_unk=True))
    tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    tokenizer.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    tokenizer.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size + 256, special_tokens=["<unk>", "<s>", "</s>", *byte_tokens], show_progress=False
    )
    tokenizer.train_from_iterator([t for t in CORPUS if not t.startswith("東")], trainer)
    return tokenizer


def write_tokenizer(folder: Path, *, chat_template: str | None = CHATML_TEMPLATE) -> int:
    """tokenizer.json + tokenizer_config.json into folder; returns the vocabulary size."""
    tokenizer = byte_level_tokenizer()
    tokenizer.save(str(folder / "tokenizer.json"))
    config = {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": "<|endoftext|>"}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizer.get_vocab_size()


TINY = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)

# Every architecture and config switch the model supports: (model_type, config overrides).
VARIANTS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=128, vocab_size=512)),
    "llama": ("llama", {}),
    "llama-bias": ("llama", dict(attention_bias=True, mlp_bias=True)),
    "llama-head-dim": ("llama", dict(head_dim=32)),
    "llama-untied-mha": ("llama", dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "llama-rope-linear": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "llama-rope-dynamic": (
        "llama",
        dict(max_position_embeddings=8, rope_parameters={"rope_type": "dynamic", "factor": 8.0, "rope_theta": 10000.0}),
    ),
    "llama-rope-llama3": (
        "llama",
        dict(rope_parameters={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 32, "rope_theta": 500000.0}),
    ),
    "llama-rope-yarn": (
        "llama",
        dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64,
                              "rope_theta": 10000.0}),
    ),
    "mistral-window": ("mistral", dict(sliding_window=4)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen2-window": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("qwen3", dict(head_dim=16)),
    "gemma": ("gemma", dict(head_dim=16)),
    "gemma2": ("gemma2", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16)),
    # Phi-3: fused projections in the checkpoint; longrope switches to its long factors past 8 positions
    "phi3": ("phi3", dict(original_max_position_embeddings=8,
                          rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                           "short_factor": [1.0 + 0.1 * i for i in range(8)],
                                           "long_factor": [2.0 + 0.5 * i for i in range(8)]})),
    "phi3-4k": ("phi3", dict(sliding_window=6)),  # the short-context variant: a window on every layer, no longrope
    # Gemma 3 as its GGUF files describe it: llama.cpp's layer pattern (every 6th global) and local base 10000
    "gemma3-gguf": ("gemma3_text", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16)),
    "smollm3": ("smollm3", dict(no_rope_layer_interval=2)),  # layer 1 attends without rotation
    # Gemma 3: sliding and full layers alternate, each with its own rotary table (the full one scaled)
    "gemma3": ("gemma3_text", dict(head_dim=16, sliding_window=4, query_pre_attn_scalar=16,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                                    "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                                       "rope_theta": 10000.0}})),
}


def tiny_model(folder: Path, variant: str, *, seed: int = 0, tokenizer: bool = False,
               eos_token_id: int | None = 2):
    """Build, save and return a tiny random transformers model (float32) for a VARIANTS entry."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = VARIANTS[variant]
    fields = dict(overrides) if model_type == "gpt2" else {**TINY, **overrides}
    config = AutoConfig.for_model(model_type, bos_token_id=1, eos_token_id=eos_token_id, pad_token_id=0, **fields)
    torch.manual_seed(seed)
    attn = "eager" if model_type == "gemma2" else "sdpa"  # transformers' sdpa path cannot soft-cap
    model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=torch.float32).eval()
    with torch.no_grad():  # random init is small: widen it so that the tests compare meaningful logits
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0, 0.2)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    if tokenizer:
        write_tokenizer(folder)
    return model


def run_cli(*args: str, stdin: str | bytes | None = "", env: dict | None = None, timeout: float = 300,
            offline: bool = True):
    """The real `localgpt` in a child process (text in and out; bytes on stdin are passed as they are, and any
    bad UTF-8 that comes back is replaced). `env` adds to this process's environment; offline=False drops the
    suite's HF_HUB_OFFLINE=1 for tests that talk to a stand-in hub."""
    import os
    import subprocess
    import sys

    environment = {k: v for k, v in os.environ.items() if offline or k != "HF_HUB_OFFLINE"}
    environment.update(env or {})
    data = stdin.encode() if isinstance(stdin, str) else stdin
    result = subprocess.run([sys.executable, "-m", "localgpt", *args], input=data, capture_output=True,
                            timeout=timeout, env=environment, stdin=None if data is not None else subprocess.DEVNULL)
    result.stdout = result.stdout.decode("utf-8", errors="replace")
    result.stderr = result.stderr.decode("utf-8", errors="replace")
    return result


def assert_clean_error(result, code: int, message: str):
    """One `Error: …` line on stderr that says `message`, the exit code, and no traceback."""
    assert result.returncode == code, result.stderr
    assert result.stderr.startswith("Error: ") and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def stored_weight(weight, form: str, bnb):
    """A float weight in bitsandbytes' storage as a checkpoint holds it (form: 8, nf4, fp4, nf4-double or
    fp4-double), and bitsandbytes' own float32 dequantization of it."""
    from localgpt.quantize import QuantizedWeight

    if form == "8":
        data, scb, _ = bnb.functional.int8_vectorwise_quant(weight.half())
        return QuantizedWeight(8, tuple(weight.shape), data, scb), bnb.functional.int8_vectorwise_dequant(data, scb)
    quant_type, double = form.split("-")[0], form.endswith("-double")
    data, state = bnb.functional.quantize_4bit(weight, blocksize=64, compress_statistics=double,
                                              quant_type=quant_type)
    expected = bnb.functional.dequantize_4bit(data, state)  # float32: the weight's dtype
    tensors = {"weight": data, **state.as_dict(packed=True)}  # as transformers writes it, nested absmax included
    return QuantizedWeight.from_checkpoint(tensors, "w", bnb), expected
