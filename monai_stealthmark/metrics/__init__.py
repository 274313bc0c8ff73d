"""Metrics (maths only; the ignite wiring lives in handlers)."""

from __future__ import annotations

from .auc import pixel_auc
