"""What tokens cost. Catalogue prices are credits per 1M tokens, which is exactly µcr per token.

All functions take and return integers (µcr, tokens); they never round.
"""

from __future__ import annotations

__all__ = ["UNLIMITED_TOKENS", "affordable_completion_tokens", "cached_saving", "cost"]

# What `affordable_completion_tokens` answers when completion tokens are free: more than any context.
UNLIMITED_TOKENS = 2**62


def cost(
    prompt_tokens: int,
    completion_tokens: int,
    price_input: int,
    price_output: int,
    *,
    cached_tokens: int = 0,
    price_cached_input: int | None = None,
) -> int:
    """µcr for a request: prompt × input price + completion (reasoning included) × output price, less
    `cached_saving` for the prompt tokens served from the prefix cache.

    Raises `ValueError` on a negative count or price, or more cached than prompt tokens (a bug upstream,
    never a client error).
    """
    if min(prompt_tokens, completion_tokens, price_input, price_output) < 0:
        raise ValueError("token counts and prices must be non-negative")
    full = prompt_tokens * price_input + completion_tokens * price_output
    return full - cached_saving(prompt_tokens, cached_tokens, price_input, price_cached_input)


def cached_saving(
    prompt_tokens: int, cached_tokens: int, price_input: int, price_cached_input: int | None
) -> int:
    """µcr that `cached_tokens` of the prompt cost less at `price_cached_input` (None: no discount)."""
    if price_cached_input is None:
        return 0
    if not 0 <= cached_tokens <= prompt_tokens or not 0 <= price_cached_input <= price_input:
        raise ValueError("cached tokens must be part of the prompt and the cached price at most the input's")
    return cached_tokens * (price_input - price_cached_input)


def affordable_completion_tokens(
    balance: int, prompt_tokens: int, price_input: int, price_output: int
) -> int:
    """The largest n with prompt cost + n × output price <= balance.

    A result below 1 means not even one completion token is affordable (it is negative when the prompt
    alone costs more than the balance). With free completion tokens the answer is `UNLIMITED_TOKENS`
    if the prompt is affordable, else -1.
    """
    remaining = balance - cost(prompt_tokens, 0, price_input, 0)
    if price_output < 0:
        raise ValueError("prices must be non-negative")
    if price_output == 0:
        return UNLIMITED_TOKENS if remaining >= 0 else -1
    return remaining // price_output
