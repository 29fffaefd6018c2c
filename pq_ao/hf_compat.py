"""The one place that knows how supported transformers releases differ.

transformers 5.24 renamed the cache argument of models, decoder layers and attention modules from
`past_key_values` to `cache` (the old name still works, with a deprecation warning, until 5.40). Everything in pq_ao
that reads or passes a cache goes through these helpers, so both spellings work.
"""

from __future__ import annotations

import inspect

from torch import nn

CACHE_KWARGS = ("cache", "past_key_values")  # new name first


def cache_in(kwargs: dict):
    """The cache passed in `kwargs` under either name, or None."""
    for name in CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def without_cache(kwargs: dict) -> dict:
    """`kwargs` less any cache argument, with `use_cache=False`."""
    out = {k: v for k, v in kwargs.items() if k not in CACHE_KWARGS}
    out["use_cache"] = False
    return out


def cache_kwarg(model: nn.Module) -> str:
    """The name under which `model.forward` takes its cache."""
    params = inspect.signature(model.forward).parameters
    return next((n for n in CACHE_KWARGS if n in params), "past_key_values")


def output_cache(outputs):
    """The cache returned in a model output (`.cache` from 5.24, `.past_key_values` before)."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)
