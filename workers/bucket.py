"""Moved to ``workers.admission``. This alias stays only until ``tests/test_pipeline.py`` (whose
owner is changing it) imports ``Bucket`` from there; add nothing to it, then delete it."""

from __future__ import annotations

from workers.admission import Bucket

__all__ = ["Bucket"]
