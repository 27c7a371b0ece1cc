"""Logits processors and samplers: pure functions on tensors, with transformers' semantics and order.

Order (as transformers' generate): repetition penalty, no-repeat-ngram, then temperature → top-k → top-p → min-p →
typical-p. The OpenAI-style processors transformers does not have (presence and frequency penalties over the
answer's tokens, a per-token logit bias) run after the penalties and before the warpers, as vLLM applies them.
Shapes: logits (B, V) float32, history (B, L) token ids.
"""

from __future__ import annotations

import torch

from localgpt.settings import SamplingOptions

__all__ = ["SamplingOptions"]  # re-exported: the schema lives in settings.py, torch-free

NEG_INF = float("-inf")


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


def apply_presence_frequency(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                             frequency: float) -> torch.Tensor:
    """OpenAI's penalties: counts (B, V) is how often each token occurs in the answer so far (not the prompt);
    logit - presence * [count > 0] - frequency * count."""
    if not presence and not frequency:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def apply_logit_bias(logits: torch.Tensor, bias: dict[int, float] | None) -> torch.Tensor:
    """Add a bias to chosen token ids' logits (OpenAI's logit_bias: -100 bans, +100 all but forces)."""
    if not bias:
        return logits
    ids = torch.tensor(list(bias), dtype=torch.long, device=logits.device)
    return logits.index_add(-1, ids, torch.tensor(list(bias.values()), dtype=logits.dtype, device=logits.device)
                            .expand(logits.shape[0], -1))


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


def apply_typical_p(logits: torch.Tensor, mass: float, min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Locally typical sampling: rank tokens by how far their surprise (-log p) is from the distribution's entropy,
    and keep the closest ones until they hold `mass` of the probability (the token that crosses it included)."""
    if mass >= 1.0:
        return logits
    log_probs = torch.log_softmax(logits, dim=-1)
    entropy = -(log_probs.exp() * log_probs).nansum(dim=-1, keepdim=True)  # (B, 1); nansum: 0 * -inf terms
    distance, order = torch.sort((-log_probs - entropy).abs(), dim=-1)  # most typical first
    cumulative = logits.gather(-1, order).softmax(dim=-1).cumsum(dim=-1)
    last_kept = (cumulative < mass).sum(dim=-1, keepdim=True).clamp(max=logits.shape[-1] - 1)
    remove_sorted = distance > distance.gather(-1, last_kept)  # ties with the last kept token stay
    remove_sorted[..., :min_tokens_to_keep] = False
    return logits.masked_fill(remove_sorted.scatter(1, order, remove_sorted), NEG_INF)


def process_logits(logits: torch.Tensor, history: torch.Tensor, options: SamplingOptions,
                   min_tokens_to_keep: int = 1, answer_counts: torch.Tensor | None = None,
                   logit_bias: dict[int, float] | None = None) -> torch.Tensor:
    """All processors in transformers' order. The warpers (temperature onward) only apply when sampling.
    answer_counts (B, V): token counts of the answer so far, for the presence and frequency penalties."""
    logits = apply_repetition_penalty(logits, history, options.repetition_penalty)
    if options.no_repeat_ngram_size:
        logits = apply_no_repeat_ngram(logits, history.tolist(), options.no_repeat_ngram_size)
    if answer_counts is not None:
        logits = apply_presence_frequency(logits, answer_counts, options.presence_penalty, options.frequency_penalty)
    logits = apply_logit_bias(logits, logit_bias)
    if options.greedy:
        return logits
    logits = apply_temperature(logits, options.temperature)
    logits = apply_top_k(logits, options.top_k, min_tokens_to_keep)
    logits = apply_top_p(logits, options.top_p, min_tokens_to_keep)
    logits = apply_min_p(logits, options.min_p, min_tokens_to_keep)
    return apply_typical_p(logits, options.typical_p, min_tokens_to_keep)


def sample(logits: torch.Tensor, options: SamplingOptions, generator: torch.Generator | None) -> torch.Tensor:
    """(B, V) processed logits → (B,) token ids: argmax when greedy, else a draw from softmax(logits)."""
    if options.greedy:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(1)
