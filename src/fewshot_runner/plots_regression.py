"""Pictures of regression tasks (engine/pictures.py registers them with ``@picture_maker("regression")``):
the adapted function against the truth after 0, 1 and 10 inner steps (sinusoid)."""

from __future__ import annotations
