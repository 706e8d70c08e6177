"""Argument checks shared by the reference formats: each failure is a ValueError naming the
argument, what was expected and what was given."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def tensor(name: str, value: object) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise ValueError(f"{name}: expected a torch.Tensor, given {type(value).__name__}")
    return value


def dtype(name: str, value: torch.Tensor, expected: tuple[torch.dtype, ...]) -> None:
    if value.dtype not in expected:
        names = " or ".join(str(d) for d in expected)
        raise ValueError(f"{name}: expected dtype {names}, given {value.dtype}")


def ndim(name: str, value: torch.Tensor, expected: int, *, at_least: bool = False) -> None:
    ok = value.dim() >= expected if at_least else value.dim() == expected
    if not ok:
        want = f"at least {expected}" if at_least else f"{expected}"
        raise ValueError(
            f"{name}: expected {want} dimensions, given {value.dim()} (shape {tuple(value.shape)})"
        )


def shape(name: str, value: torch.Tensor, expected: tuple[int, ...]) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name}: expected shape {tuple(expected)}, given {tuple(value.shape)}")


def finite(name: str, value: torch.Tensor) -> None:
    if value.numel() and not bool(torch.isfinite(value).all()):
        bad = int((~torch.isfinite(value)).sum())
        raise ValueError(f"{name}: expected finite values, given {bad} NaN or inf")


def positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name}: expected a positive int, given {value!r}")
    return value


def float_out_dtype(name: str, value: object) -> torch.dtype:
    if value not in FLOAT_DTYPES:
        names = ", ".join(str(d) for d in FLOAT_DTYPES)
        raise ValueError(f"{name}: expected one of {names}, given {value!r}")
    return value  # type: ignore[return-value]
