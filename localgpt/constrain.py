"""Constrained decoding: answers that always parse and match a JSON schema, through llguidance.

Why llguidance: its masks take well under a millisecond per token on a CPU (Rust, computed lazily over the
tokenizer's trie, no index built ahead), it reads the model's own tokenizer.json (no transformers needed), and it
ships wheels for Linux x86-64 and ARM, macOS and Windows. (xgrammar wants transformers to describe a tokenizer;
outlines-core builds an index of the whole schema up front, slow for large ones.)

`Grammars` wraps one model's tokenizer (built once, about half a second); each answer gets its own `Constraint`,
whose `apply` masks the logits to the tokens the grammar allows next and `consume` advances it. When the value is
complete only the end-of-sequence token is allowed, so the answer ends there.
"""

from __future__ import annotations

import json

import torch

from localgpt.errors import UsageError


class Constraint:
    def __init__(self, matcher, vocab_size: int):
        self.matcher, self.vocab_size = matcher, vocab_size

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """logits (1, V) with every token the grammar forbids next at -inf."""
        mask = torch.frombuffer(bytearray(self.matcher.compute_bitmask()), dtype=torch.uint8)
        bits = torch.arange(8, dtype=torch.uint8)
        allowed = ((mask[:, None] >> bits) & 1).flatten()[: logits.shape[-1]].bool()  # little-endian bit order
        return logits.masked_fill(~allowed.to(logits.device), float("-inf"))

    def consume(self, token: int) -> None:
        self.matcher.consume_token(token)


class Grammars:
    def __init__(self, tokenizer, vocab_size: int):
        import llguidance

        self.llguidance, self.vocab_size = llguidance, vocab_size
        eos = min(tokenizer.eos_token_ids) if tokenizer.eos_token_ids else None
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend_json(), n_vocab=vocab_size, eos_token=eos)

    def json(self, schema: dict | None = None) -> Constraint:
        """A constraint for one JSON value matching `schema` (None: any JSON object). Whitespace between tokens
        is not free: a small model given free whitespace can spend its whole budget on it."""
        try:
            grammar = self.llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema if schema is not None else {"type": "object"}),
                defaults={"whitespace_flexible": False})
            matcher = self.llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        except (ValueError, TypeError, RuntimeError) as error:
            raise UsageError(f"the JSON schema cannot be used: {error}") from None
        if matcher.is_error():
            raise UsageError(f"the JSON schema cannot be used: {matcher.get_error()}")
        return Constraint(matcher, self.vocab_size)
