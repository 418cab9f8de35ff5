"""Cached-input prices: the arithmetic and the catalogue rule (no server needed)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from tokentill.billing import pricing
from tokentill.catalog import ModelSpec


def test_cached_tokens_cost_the_cached_price() -> None:
    full = pricing.cost(1000, 10, 100, 200)
    discounted = pricing.cost(1000, 10, 100, 200, cached_tokens=600, price_cached_input=10)
    assert full - discounted == 600 * 90 == pricing.cached_saving(1000, 600, 100, 10)
    assert pricing.cost(1000, 10, 100, 200, cached_tokens=600, price_cached_input=None) == full
    with pytest.raises(ValueError):
        pricing.cached_saving(10, 11, 100, 10)  # more cached than prompt tokens: a bug, never billed


def test_catalogue_default_and_ceiling() -> None:
    assert ModelSpec(id="m", price_input=15).cached_price == 15  # default: no discount
    assert ModelSpec(id="m", price_input=15, price_cached_input=7).cached_price == 7
    with pytest.raises(ValidationError, match="price_cached_input"):
        ModelSpec(id="m", price_input=15, price_cached_input=16)
