"""Logits processors and samplers: pure functions on tensors, with transformers' semantics and order.

Order (as transformers' generate): repetition penalty, no-repeat-ngram, then temperature → top-k → top-p → min-p →
typical-p. The OpenAI-style processors transformers does not have (presence and frequency penalties over the
answer's tokens, a per-token logit bias) run after the penalties and before the warpers, as vLLM applies them.
Shapes: logits (B, V) float32, history (B, L) token ids.
"""

from __future__ import annotations

import numpy as np
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
    """Keep the smallest set of most likely tokens whose probabilities add up to more than top_p.

    As transformers computes it: the logits sorted ascending, softmax, cumulative sum, and the tokens whose sum is at
    most 1 - top_p removed (a prefix of the sorted order). On CPU the sorted values come from numpy's sort and the
    removed prefix is mapped back by value (_removed_by_value): torch.sort with indices took 6 ms for a 49,152-token
    vocabulary (a third of a SmolLM2 step), numpy's 0.2 ms. Where tied logits straddle the boundary, the
    lowest-indexed of them go; transformers leaves that choice to torch's unstable sort."""
    if top_p >= 1.0:
        return logits
    by_value = logits.device.type == "cpu" and logits.dtype == torch.float32 and logits.dim() == 2
    if by_value:
        sorted_logits, sorted_indices = torch.from_numpy(np.sort(logits.numpy(), axis=-1)), None
    else:
        sorted_logits, sorted_indices = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)
    remove_sorted[..., -min_tokens_to_keep:] = False
    if by_value:
        remove = _removed_by_value(logits, sorted_logits, remove_sorted)
    else:
        remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return logits.masked_fill(remove, NEG_INF)


def _removed_by_value(logits: torch.Tensor, sorted_logits: torch.Tensor, remove_sorted: torch.Tensor) -> torch.Tensor:
    """Which tokens a removed prefix of the ascending order (remove_sorted, over sorted_logits) is, without the sort's
    indices: with r removed, the tokens below the r-th sorted value, and of those equal to it the first
    r - (how many are below it) by index."""
    removed = remove_sorted.sum(dim=-1, keepdim=True)  # (B, 1)
    last_removed = sorted_logits.gather(1, (removed - 1).clamp(min=0))
    below = logits < last_removed
    ties = logits == last_removed
    ties_removed = removed - below.sum(dim=-1, keepdim=True)
    return (below | (ties & (ties.cumsum(dim=-1) <= ties_removed))) & (removed > 0)


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
    """(B, V) processed logits → (B,) token ids: argmax when greedy, else a draw from softmax(logits).

    The draw is one uniform number per row, found in the probabilities' cumulative sum (in float64): a token of
    probability 0 is never drawn. torch.multinomial drew the same distribution in 2.2 ms for a 49,152-token
    vocabulary; this takes ~0.2 ms."""
    if options.greedy:
        return logits.argmax(dim=-1)
    cumulative = torch.softmax(logits, dim=-1).double().cumsum(dim=-1)
    total = cumulative[:, -1:]
    if not bool(torch.isfinite(total).all() and (total > 0).all()):
        raise ValueError("no token can be sampled: every logit is -inf or NaN")
    draw = torch.rand(logits.shape[0], 1, generator=generator, dtype=torch.float64, device=logits.device) * total
    draw = torch.minimum(draw, total.nextafter(torch.zeros_like(total)))  # strictly below the total
    return torch.searchsorted(cumulative, draw, right=True).squeeze(1)
