"""Flask's JSON, always valid JSON: never a bare NaN or Infinity."""

from __future__ import annotations

import logging
import math
from typing import Any

from flask.json.provider import DefaultJSONProvider

log = logging.getLogger(__name__)


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float replaced by None (JSON has no NaN)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


class StrictJSONProvider(DefaultJSONProvider):
    """Flask JSON that is always valid JSON: never a bare NaN or Infinity.

    The contract refuses non-finite numbers, but a row stored before it did (or a
    bug) must not turn a whole page into something no JSON parser reads: such a
    float is written as null (and logged), and everything else is unchanged.
    """

    sort_keys = False  # keep documented key order in responses

    def dumps(self, obj: Any, **kwargs: Any) -> str:
        kwargs["allow_nan"] = False
        try:
            return super().dumps(obj, **kwargs)
        except ValueError as exc:
            if "Out of range float" not in str(exc):
                raise
            log.warning("non-finite number in a JSON response, written as null")
            return super().dumps(_finite(obj), **kwargs)
