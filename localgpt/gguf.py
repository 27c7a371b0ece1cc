"""GGUF file → Hugging Face style model folder (config.json, model.safetensors, tokenizer.json, ...).

Read with ggml-org's `gguf` package and dequantized with `gguf.quants`. llama.cpp stores the q and k projections
of `llama`-architecture files with their rows permuted for its own RoPE layout; that permutation is undone here
(and only there), as transformers' own GGUF loader does. The folder is written next to its destination and
renamed into place at the end, so an interrupted conversion never leaves a folder that looks complete.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from localgpt.atomic import atomic_folder, refuse_existing
from localgpt.errors import ModelError

SUPPORTED_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "phi3": "Phi3ForCausalLM",
                           "gemma3": "Gemma3ForCausalLM"}
TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED = 3, 4

# How text is split before byte-level BPE, by `tokenizer.ggml.pre` (as transformers and llama.cpp do);
# anything else gets GPT-2's own ByteLevel split.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_SPLITS = {
    "llama3": _LLAMA3_SPLIT, "llama-v3": _LLAMA3_SPLIT, "llama-bpe": _LLAMA3_SPLIT, "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT, "deepseek-r1-qwen": _QWEN2_SPLIT,
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Phi-3 files keep q/k/v and gate/up fused, as transformers' Phi3 does (llama.cpp's ffn_up is then both halves).
_PHI3_LAYER_NAMES = {**_LAYER_NAMES, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Gemma 3's extra norms; llama.cpp stores every Gemma norm weight with its +1 applied (undone on reading).
_GEMMA3_LAYER_NAMES = {**_LAYER_NAMES, "post_attention_norm": "post_attention_layernorm",
                       "ffn_norm": "pre_feedforward_layernorm", "post_ffw_norm": "post_feedforward_layernorm",
                       "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
_LAYER_NAMES_BY_ARCH = {"phi3": _PHI3_LAYER_NAMES, "gemma3": _GEMMA3_LAYER_NAMES}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
ROPE_FACTORS = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}
_BLOCK = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")


def open_gguf(path: Path):
    """A GGUFReader, or our error for a file that is missing, truncated or not GGUF at all."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise ModelError("reading GGUF files needs the gguf package — pip install gguf") from None
    if not path.is_file():
        raise ModelError(f"no GGUF file at {path} — check the path")
    check_gguf_counts(path)
    try:
        return GGUFReader(str(path))
    except Exception as exc:  # the reader raises ValueError, struct/numpy errors... on damaged files
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ModelError(f"{path} is not a valid GGUF file ({detail}) — is it truncated? Download it again") from None


# Far above any real model (llama.cpp's largest files hold ~2,000 tensors and ~50 metadata keys); a larger count
# is a damaged header, refused before the reader loops over it.
MAX_GGUF_TENSORS, MAX_GGUF_KEYS = 1_000_000, 100_000


def check_gguf_counts(path: Path) -> None:
    """The fixed header (magic, version, tensor count, key count), checked before anything else is read."""
    with open(path, "rb") as file:
        head = file.read(24)
    if head[:4] != b"GGUF":
        kind = file_kind(head)
        if kind:
            raise ModelError(f"{path} is not a GGUF file: it is {kind}")
        raise ModelError(f"{path} is not a valid GGUF file (no GGUF header) — is it truncated? Download it again")
    if len(head) < 24:
        raise ModelError(f"{path} is not a valid GGUF file (its header is cut short) — is it truncated? Download it "
                         "again")
    version = int.from_bytes(head[4:8], "little")
    tensors, keys = int.from_bytes(head[8:16], "little"), int.from_bytes(head[16:24], "little")
    if version not in (2, 3) or tensors > MAX_GGUF_TENSORS or keys > MAX_GGUF_KEYS:
        raise ModelError(f"{path} is not a valid GGUF file (version {version}, {tensors} tensors, {keys} metadata "
                         "keys) — is it damaged? Download it again")


def file_kind(head: bytes) -> str | None:
    """What a file that is not GGUF is, from its first bytes, when it is something a user may mistake for one."""
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 100 * 2**20:
        return "a safetensors file — point -m at the folder that holds it, no conversion needed"
    if head[:4] == b"PK\x03\x04":
        return "a zip archive (a PyTorch pickle checkpoint, say), which localgpt never loads"
    if head[:4] in (b"lmgg", b"fmgg", b"tjgg"):  # GGML, GGMF and GGJT, GGUF's predecessors, little-endian magics
        return "an old GGML/GGJT model — convert it to GGUF with llama.cpp first"
    if head[:1] == b"{":
        return "a JSON file"
    return None


def _field(reader, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def hf_name(gguf_name: str, arch: str = "llama") -> str | None:
    """GGUF tensor name → transformers' name (None: not ours, e.g. llama.cpp's precomputed rope_freqs)."""
    match = _BLOCK.match(gguf_name)
    if match:
        index, module, kind = match.groups()
        names = _LAYER_NAMES_BY_ARCH.get(arch, _LAYER_NAMES)
        if module in names:
            return f"model.layers.{index}.{names[module]}.{kind}"
        return None
    stem, _, kind = gguf_name.rpartition(".")
    return f"{_TOP_NAMES[stem]}.{kind}" if stem in _TOP_NAMES else None


def unpermute_qk(weight, num_heads: int):
    """Undo llama.cpp's q/k row permutation (rows of each head interleaved in pairs → rotate-half halves)."""
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def read_config(reader, path: Path) -> tuple[dict, dict]:
    """(config.json, tokenizer metadata) from the file's key/values."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ModelError(
            f"{path.name}: GGUF architecture '{arch}' is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if not tokens:
        raise ModelError(f"{path.name} has no tokenizer vocabulary — localgpt needs one to run the model")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    heads = int(_field(reader, f"{arch}.attention.head_count"))
    tensor_names = {t.name for t in reader.tensors}
    config: dict[str, Any] = {
        "architectures": [SUPPORTED_ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": len(tokens),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // heads)),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "rms_norm_eps": float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    rotated = _field(reader, f"{arch}.rope.dimension_count")
    if rotated and int(rotated) != config["head_dim"]:  # a partial rotary: said, so that it is refused by name
        config["partial_rotary_factor"] = int(rotated) / config["head_dim"]
    if arch == "gemma3":
        config.update(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh",
                      # llama.cpp's choices, which its files do not state: the sliding layers' base 10000, and
                      # queries scaled by the head size (hidden / heads for the 62-layer 27B)
                      rope_local_base_freq=10000.0,
                      query_pre_attn_scalar=hidden // heads if config["num_hidden_layers"] == 62 else
                      config["head_dim"])
        window = _field(reader, "gemma3.attention.sliding_window")
        if window:
            config["sliding_window"] = int(window)
    if arch == "phi3":
        window = _field(reader, "phi3.attention.sliding_window")
        if window:
            config["sliding_window"] = int(window)
        original = _field(reader, "phi3.rope.scaling.original_context_length")
        config["original_max_position_embeddings"] = int(original or config["max_position_embeddings"])
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling and scaling != "none":
        factor = float(_field(reader, f"{arch}.rope.scaling.factor", 1.0))
        config["rope_scaling"] = {"rope_type": scaling, "factor": factor}
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        if original:
            config["rope_scaling"]["original_max_position_embeddings"] = int(original)
    for name in ("bos", "eos", "padding", "unknown"):
        value = _field(reader, f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            key = {"padding": "pad", "unknown": "unk"}.get(name, name)
            config[f"{key}_token_id"] = int(value)
    tokenizer_meta = {
        "model": _field(reader, "tokenizer.ggml.model"),
        "pre": _field(reader, "tokenizer.ggml.pre"),
        "tokens": tokens,
        "token_type": _field(reader, "tokenizer.ggml.token_type") or [],
        "merges": _field(reader, "tokenizer.ggml.merges"),
        "scores": _field(reader, "tokenizer.ggml.scores") or [],
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "chat_template": _field(reader, "tokenizer.chat_template"),
        "architecture": arch,
    }
    return config, tokenizer_meta


def sentencepiece_merges(tokens: list[str], scores: list[float]) -> list[tuple[str, str]]:
    """The merges a SentencePiece BPE vocabulary implies (a GGUF of one lists none): every split of a piece into
    two pieces of the vocabulary, best-scored piece first, and for equal scores the shorter left part first (the
    order transformers' GGUF loader recovers, so both tokenize alike)."""
    index = {token: position for position, token in enumerate(tokens)}
    found = []
    for token, score in zip(tokens, scores, strict=False):
        pairs = [(token[:cut], token[cut:]) for cut in range(1, len(token))
                 if token[:cut] in index and token[cut:] in index]
        pairs.sort(key=lambda pair: (index[pair[0]], index[pair[1]]))
        found += [(left, right, score) for left, right in pairs]
    found.sort(key=lambda merge: (merge[2], len(merge[0]), len(merge[1])), reverse=True)
    return [(left, right) for left, right, _ in found]


def bpe_tokenizer(vocab: dict[str, int], merges: list[tuple[str, str]], path: Path, **options):
    """A `tokenizers` BPE, or our error for merges that do not fit the vocabulary."""
    from tokenizers import Tokenizer, models

    try:
        return Tokenizer(models.BPE(vocab=vocab, merges=merges, **options))
    except Exception as exc:  # tokenizers raises a bare Exception for merges that name unknown tokens
        raise ModelError(f"{path.name}: the tokenizer's merges do not fit its vocabulary ({str(exc)[:120]}) — the "
                         "file is damaged; download it again") from None


def sentencepiece_tokenizer(meta: dict, path: Path):
    """Llama's SentencePiece BPE (`tokenizer.ggml.model = llama`: TinyLlama, Llama 2, Mistral 7B v0.1) as
    transformers' LlamaTokenizer builds it: byte fallback, "▁" for spaces with one before the text, and merges
    from the file or, where it has none, from the pieces' scores. Gemma's and Phi-3's variants by architecture."""
    from tokenizers import decoders, normalizers, pre_tokenizers

    gemma = meta.get("architecture") == "gemma3"
    tokens, scores = meta["tokens"], meta["scores"]
    if gemma:
        # Gemma's files spell a token of several spaces with real spaces, where its tokenizer looks "▁▁" up; and
        # its merges follow the order of the file, not its scores
        tokens = ["\u2581" * len(t) if len(t) > 1 and not t.strip(" ") else t for t in tokens]
        scores = [-float(position) for position in range(len(tokens))]
    if len(scores) != len(tokens) and not meta["merges"]:
        raise ModelError(f"{path.name}: the SentencePiece vocabulary has no scores to order its merges — the file "
                         "is incomplete")
    merges = [tuple(merge.split(" ", 1)) for merge in meta["merges"]] if meta["merges"] else \
        sentencepiece_merges(tokens, scores)
    # (GemmaTokenizer names its unknown token; Llama's does not)
    unk = tokens[meta["unk_token_id"]] if gemma and meta.get("unk_token_id") is not None else None
    tokenizer = bpe_tokenizer({t: i for i, t in enumerate(tokens)}, merges, path, fuse_unk=True, byte_fallback=True,
                              unk_token=unk)
    # "▁" back to spaces and bytes back to characters; then the prefix space taken off again, where one was added
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if gemma:
        # Gemma's tokenizer: no prefix space, every space a "▁" (its normalizer), as transformers' GemmaTokenizer
        tokenizer.normalizer = normalizers.Replace(" ", "\u2581")
        tokenizer.pre_tokenizer = pre_tokenizers.Split(pattern=" ", behavior="merged_with_previous")
    elif meta.get("architecture") == "phi3":
        # Phi-3's tokenizer.json puts the prefix space in a normalizer, not a Metaspace pre-tokenizer (it shows on
        # text that starts with a space); a GGUF does not carry that file, so it is chosen by architecture.
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    tokenizer.decoder = decoders.Sequence(steps if gemma else [*steps, decoders.Strip(content=" ", left=1)])
    return tokenizer


def byte_level_tokenizer(meta: dict, path: Path):
    """GPT-2's byte-level BPE from the vocabulary and merges (`tokenizer.ggml.model = gpt2`); the text is split
    first as `tokenizer.ggml.pre` says."""
    from tokenizers import Regex, decoders, pre_tokenizers

    if not meta["merges"]:
        raise ModelError(f"{path.name}: the byte-level tokenizer has no merges — the file is incomplete")
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    byte_spelling = _bytes_to_unicode()
    vocab = {}
    for index, token in enumerate(meta["tokens"]):
        spelled = token if set(token) <= alphabet else "".join(byte_spelling[b] for b in token.encode("utf-8"))
        vocab[spelled] = index
    tokenizer = bpe_tokenizer(vocab, [tuple(merge.split(" ", 1)) for merge in meta["merges"]], path, fuse_unk=False)
    split = PRE_TOKENIZER_SPLITS.get(meta["pre"])
    if split is None:
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"),
             pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def build_tokenizer(meta: dict, path: Path):
    """A `tokenizers` tokenizer from the GGUF vocabulary, as transformers' GGUF loader builds it: byte-level BPE
    (`gpt2`) or SentencePiece BPE (`llama`), with the file's control tokens as special tokens and its user-defined
    ones as added tokens."""
    from tokenizers import AddedToken, pre_tokenizers

    if meta["model"] == "llama":
        tokenizer, spellable = sentencepiece_tokenizer(meta, path), None
    elif meta["model"] == "gpt2":
        tokenizer, spellable = byte_level_tokenizer(meta, path), set(pre_tokenizers.ByteLevel.alphabet())
    else:
        raise ModelError(f"{path.name}: GGUF tokenizer type '{meta['model']}' is not supported yet (supported: gpt2 "
                         "byte-level BPE, llama SentencePiece BPE)")
    special, added = [], []
    for token, kind in zip(meta["tokens"], meta["token_type"], strict=False):  # token_type may be absent
        # (a byte-level control token outside the byte alphabet is a llama.cpp mislabel: not added)
        if kind == TOKEN_TYPE_CONTROL and (spellable is None or set(token) <= spellable):
            special.append(AddedToken(token, normalized=False, special=True))
        elif kind == TOKEN_TYPE_USER_DEFINED:
            added.append(AddedToken(token, normalized=False, special=False))
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(added)
    return with_bos(tokenizer, meta)


def with_bos(tokenizer, meta: dict):
    """The BOS token before every encoded text, when the file says to add it."""
    from tokenizers import processors

    bos_id = meta.get("bos_token_id")
    if meta["add_bos_token"] and bos_id is not None:
        bos = meta["tokens"][bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, bos_id)])
    return tokenizer


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    codes = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def read_model(reader, gguf_path: Path, dtype: str, progress=None):
    """(config.json dict, tokenizer metadata, tokenizer, tensors under transformers' names) from an open file."""
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    config, tokenizer_meta = read_config(reader, gguf_path)
    for key in ("bos", "eos", "pad", "unk"):
        tokenizer_meta[f"{key}_token_id"] = config.get(f"{key}_token_id")
    tokenizer = build_tokenizer(tokenizer_meta, gguf_path)
    torch_dtype = getattr(torch, dtype)
    config["torch_dtype"] = dtype

    tensors: dict[str, torch.Tensor] = {}
    total = len(reader.tensors)
    for done, tensor in enumerate(reader.tensors, 1):
        name = hf_name(tensor.name, tokenizer_meta["architecture"])
        if tensor.name in ROPE_FACTORS:  # Phi-3's longrope factors travel as tensors; config.json lists them
            factors = [float(v) for v in np.asarray(tensor.data, dtype=np.float32).reshape(-1)]
            config.setdefault("rope_scaling", {"rope_type": "longrope"})[ROPE_FACTORS[tensor.name]] = factors
            continue
        if name is None:
            continue
        try:
            qtype = GGMLQuantizationType(tensor.tensor_type)
            values = np.asarray(dequantize(tensor.data, qtype), dtype=np.float32)
        except (NotImplementedError, ValueError) as exc:
            raise ModelError(
                f"{gguf_path.name}: tensor '{tensor.name}' uses quantization type "
                f"{getattr(tensor.tensor_type, 'name', tensor.tensor_type)}, which cannot be converted ({exc})"
            ) from None
        shape = tuple(int(d) for d in reversed(tensor.shape))  # GGUF lists dimensions fastest-first
        values = values.reshape(shape)
        if config["model_type"] == "gemma3_text" and name.endswith("norm.weight"):
            values = values - 1.0  # llama.cpp wrote Gemma's (1 + w) as its sum
        if config["model_type"] == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            values = unpermute_qk(values, heads)
        tensors[name] = torch.from_numpy(np.array(values, dtype=np.float32, order="C")).to(torch_dtype)
        if progress:
            progress(done, total)
    return config, tokenizer_meta, tokenizer, tensors


def special_tokens(config: dict, tokenizer_meta: dict) -> dict:
    """tokenizer_config.json: the special tokens' texts by their ids, the BOS setting, the context."""
    tokens = tokenizer_meta["tokens"]
    tokenizer_config = {
        name: tokens[config[f"{key}_token_id"]]
        for name, key in (("bos_token", "bos"), ("eos_token", "eos"), ("pad_token", "pad"), ("unk_token", "unk"))
        if config.get(f"{key}_token_id") is not None
    }
    tokenizer_config["add_bos_token"] = tokenizer_meta["add_bos_token"]
    tokenizer_config["model_max_length"] = config["max_position_embeddings"]
    return tokenizer_config


def convert(gguf_path: Path, output: Path, dtype: str = "bfloat16", force: bool = False,
            progress=None) -> Path:
    """Write a Hugging Face style folder for gguf_path at output (atomically). Returns output."""
    from safetensors.torch import save_file

    from localgpt.families import config_from_dict

    if dtype not in ("bfloat16", "float32"):
        raise ModelError(f"--dtype for convert must be bfloat16 or float32, not {dtype!r}")
    refuse_existing(output, force)
    reader = open_gguf(gguf_path)
    try:
        config, tokenizer_meta, tokenizer, tensors = read_model(reader, gguf_path, dtype, progress)
        tokenizer_config = special_tokens(config, tokenizer_meta)
        config_from_dict(config, source=f"{gguf_path.name} (its metadata)")  # sizes that can build a model
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ZeroDivisionError, OverflowError) as exc:
        # A file that parses but whose metadata is damaged: a key renamed, a count or an id out of range.
        detail = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
        raise ModelError(f"{gguf_path.name}: the GGUF metadata is damaged or incomplete ({detail}) — download it "
                         "again") from None

    with atomic_folder(output, force) as scratch:
        save_file(tensors, str(scratch / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.save(str(scratch / "tokenizer.json"))
        (scratch / "config.json").write_text(json.dumps(config, indent=2))
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
        (scratch / "generation_config.json").write_text(json.dumps(generation, indent=2))
        (scratch / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        if tokenizer_meta["chat_template"]:
            (scratch / "chat_template.jinja").write_text(tokenizer_meta["chat_template"])
        (scratch / "localgpt.json").write_text(json.dumps({"source": str(gguf_path), "converted_from": "gguf"}))
    return output


def gguf_stem(filename: str) -> str:
    """SmolLM2-135M-Instruct.Q4_1.gguf → SmolLM2-135M-Instruct (the quantization suffix says nothing once
    dequantized)."""
    stem = filename.removesuffix(".gguf")
    return re.sub(r"[.-](?:[QqIi][A-Za-z0-9_]+|[Ff](?:16|32)|[Bb][Ff]16)$", "", stem) or stem
