"""What the recall router tests share: the repo root and two tenants over the tagger's namespaces."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KEYS = {"alpha": "key-alpha", "beta": "key-beta"}
TENANT_NAMESPACES = {
    "alpha": ["banking", "travel"],
    "beta": ["kitchen", "music", "podcasts"],
}  # podcasts: unknown
