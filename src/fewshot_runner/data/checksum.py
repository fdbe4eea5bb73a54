"""The checksum of a class split (no torch here: `fewshot data check` imports it)."""

from __future__ import annotations

import hashlib


def split_checksum(names: dict[str, list[str]]) -> str:
    """sha256 (16 hex digits) of the class lists of train, val, test in order: ``"<split>\\t<class>\\n"`` per class."""
    text = "".join(f"{s}\t{c}\n" for s in ("train", "val", "test") for c in names.get(s, []))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
