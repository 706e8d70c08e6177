"""Shared by the format tests: a seeded generator (the seed printed, and settable with
EXPERTFLOW_TEST_SEED to rerun a failure) and weights spread over many magnitudes."""

from __future__ import annotations

import os
import random

import pytest
import torch


@pytest.fixture
def gen() -> torch.Generator:
    seed = int(os.environ.get("EXPERTFLOW_TEST_SEED", random.SystemRandom().randrange(2**31)))
    print(f"seed={seed} (rerun with EXPERTFLOW_TEST_SEED={seed})")
    return torch.Generator().manual_seed(seed)


def random_weight(gen: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """Gaussian values with row magnitudes spread over 10^-3..10^3."""
    w = torch.randn(rows, cols, generator=gen)
    return w * 10.0 ** (torch.rand(rows, 1, generator=gen) * 6 - 3)
