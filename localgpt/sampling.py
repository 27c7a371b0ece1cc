"""Logits processors and samplers: pure functions on tensors, with transformers' semantics and order.

Order (as transformers' generate): repetition penalty, no-repeat-ngram, then temperature → top-k → top-p → min-p.
Shapes: logits (B, V) float32, history (B, L) token ids.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from localgpt.errors import UsageError

NEG_INF = float("-inf")


@dataclass(frozen=True)
class SamplingOptions:
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 0.9  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    no_repeat_ngram_size: int = 0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> SamplingOptions:
        checks = [
            (self.temperature >= 0, f"--temperature must be >= 0 (0 = greedy), not {self.temperature}"),
            (0 < self.top_p <= 1, f"--top-p must be in (0, 1], not {self.top_p}"),
            (self.top_k >= 0, f"--top-k must be >= 0 (0 = off), not {self.top_k}"),
            (0 <= self.min_p <= 1, f"--min-p must be in [0, 1], not {self.min_p}"),
            (self.repetition_penalty > 0, f"--repetition-penalty must be > 0, not {self.repetition_penalty}"),
            (self.no_repeat_ngram_size >= 0, f"--no-repeat-ngram-size must be >= 0, not {self.no_repeat_ngram_size}"),
        ]
        for ok, message in checks:
            if not ok:
                raise UsageError(message)
        return self


def apply_repetition_penalty(logits: torch.Tensor, history: torch.Tensor, penalty: float) -> torch.Tensor:
    """Every token already seen (prompt included) is made less likely: positive logits / penalty, negative * penalty."""
    if penalty == 1.0 or history.numel() == 0:
        return logits
    seen = torch.gather(logits, 1, history)
    seen = torch.where(seen < 0, seen * penalty, seen / penalty)
    return logits.scatter(1, history, seen)


def banned_ngram_tokens(history: list[int], n: int) -> list[int]:
    """Tokens that would complete an n-gram already present in history."""
    if n <= 0 or len(history) + 1 < n:
        return []
    prefix = tuple(history[len(history) - n + 1 :]) if n > 1 else ()
    return [
        history[i + n - 1] for i in range(len(history) - n + 1) if tuple(history[i : i + n - 1]) == prefix
    ]


def apply_no_repeat_ngram(logits: torch.Tensor, histories: list[list[int]], n: int) -> torch.Tensor:
    if n <= 0:
        return logits
    logits = logits.clone()
    for row, history in enumerate(histories):
        banned = banned_ngram_tokens(history, n)
        if banned:
            logits[row, banned] = NEG_INF
    return logits


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    return logits if temperature == 1.0 else logits / temperature


def apply_top_k(logits: torch.Tensor, top_k: int, min_tokens_to_keep: int = 1) -> torch.Tensor:
    if top_k <= 0:
        return logits
    k = min(max(top_k, min_tokens_to_keep), logits.shape[-1])
    kth_largest = torch.topk(logits, k, dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth_largest, NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probabilities add up to more than top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def apply_min_p(logits: torch.Tensor, min_p: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the most likely token's."""
    if min_p <= 0:
        return logits
    probs = torch.softmax(logits, dim=-1)
    threshold = min_p * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    # Never drop the min_tokens_to_keep most likely tokens.
    keep = torch.topk(probs, min(min_tokens_to_keep, probs.shape[-1]), dim=-1).indices
    remove = remove.scatter(1, keep, False)
    return logits.masked_fill(remove, NEG_INF)


def process_logits(logits: torch.Tensor, history: torch.Tensor, options: SamplingOptions,
                   min_tokens_to_keep: int = 1) -> torch.Tensor:
    """All processors in transformers' order. The warpers (temperature onward) only apply when sampling."""
    logits = apply_repetition_penalty(logits, history, options.repetition_penalty)
    if options.no_repeat_ngram_size:
        logits = apply_no_repeat_ngram(logits, history.tolist(), options.no_repeat_ngram_size)
    if options.greedy:
        return logits
    logits = apply_temperature(logits, options.temperature)
    logits = apply_top_k(logits, options.top_k, min_tokens_to_keep)
    logits = apply_top_p(logits, options.top_p, min_tokens_to_keep)
    return apply_min_p(logits, options.min_p, min_tokens_to_keep)


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits → (B,) token ids: argmax when greedy, else a draw from softmax(logits)."""
    if options.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
