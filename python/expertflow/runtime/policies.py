"""The cache's eviction policies and slot budgets, named once.

The policy names come from the native core (``core::kPolicyNames``), so the cache, offload,
replay and the command line offer exactly what the core implements.
"""

from __future__ import annotations

from expertflow import _C

__all__ = ["BUDGETS", "POLICIES"]

POLICIES: tuple[str, ...] = tuple(_C.policy_names())
BUDGETS: tuple[str, ...] = ("per_layer", "global")
