"""The hash of a recipe and of each run: SHA-256 of the canonical JSON form.

``--resume`` compares the hashes a run directory recorded with the recipe's, so these
two functions decide whether a run started before can be continued: change them only
with a migration (tests/test_recipe_hashes.py holds every shipped recipe's hashes).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any


def canonical_form(data: Any) -> Any:
    """The value the hash is taken of: integral floats as integers (``epochs: 3.0`` is
    ``epochs: 3``; JSON Schema counts both as integers) where a float holds them exactly
    (below 2^53), tuples as lists."""
    if isinstance(data, dict):
        return {str(k): canonical_form(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [canonical_form(v) for v in data]
    if isinstance(data, float) and data.is_integer() and abs(data) < 2 ** 53:  # 1e30 stays a float
        return int(data)
    return data


def canonical_hash(data: Any) -> str:
    """SHA-256 (first 16 hex digits) of the canonical JSON form: sorted keys, no spaces,
    numbers by value. Independent of key order and YAML spelling (``1e-3`` = ``0.001``,
    ``3.0`` = ``3``); any changed value, added or removed key changes it."""
    text = json.dumps(canonical_form(data), sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
