"""Expert weight formats: plain-torch references of fp8 block, int8 and int4 (DESIGN.md 8)."""

from __future__ import annotations

from .reference import *  # noqa: F403
from .reference import __all__  # noqa: F401
