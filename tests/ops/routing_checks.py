"""Comparison of two routings that tolerates only genuine near-ties of the reference."""

from __future__ import annotations

import torch


def assert_same_routing(
    ids: torch.Tensor,
    weights: torch.Tensor,
    ref_ids: torch.Tensor,
    ref_weights: torch.Tensor,
    ref_keys: torch.Tensor | None = None,
    *,
    key_rtol: float = 0.0,
    ordered: bool = True,
    rtol: float = 2e-6,
    atol: float = 1e-7,
) -> None:
    """Asserts two routings agree: ids exactly, weights to fp32 rounding.

    A row may pick a different expert only where the reference's own selection keys tie (or,
    with ``key_rtol > 0``, nearly tie, for keys that pass through exp/sigmoid whose last-ulp
    rounding differs between implementations): every swapped expert's key must then equal the
    reference's k-th key within ``key_rtol``. Without ``ref_keys`` the ids must match exactly.
    With ``ordered=False`` (routers using ``topk(sorted=False)``) rows compare as sets.
    """
    ids = ids.cpu().long()
    ref_ids = ref_ids.cpu().long()
    weights = weights.cpu().float()
    ref_weights = ref_weights.cpu().float()
    assert ids.shape == ref_ids.shape, (ids.shape, ref_ids.shape)
    if not ordered:
        ids, perm = ids.sort(dim=-1)
        weights = weights.gather(-1, perm)
        ref_ids, ref_perm = ref_ids.sort(dim=-1)
        ref_weights = ref_weights.gather(-1, ref_perm)
    differ = (ids != ref_ids).any(dim=-1)
    if differ.any():
        rows = differ.nonzero().flatten().tolist()
        assert ref_keys is not None, f"ids differ in rows {rows[:10]}"
        keys = ref_keys.cpu().float()
        for row in rows:
            chosen_keys = keys[row, ref_ids[row]]
            kth = chosen_keys.min()
            swapped = set(ids[row].tolist()) ^ set(ref_ids[row].tolist())
            if not swapped:
                # Same set, other order: both are best first, so the key sequences must agree
                # position by position (equal keys permuted among themselves).
                ours, theirs = keys[row, ids[row]], keys[row, ref_ids[row]]
                assert torch.allclose(ours, theirs, rtol=key_rtol, atol=0), (
                    f"row {row}: order differs without a tie: {ids[row].tolist()} vs "
                    f"{ref_ids[row].tolist()}, keys {ours.tolist()} vs {theirs.tolist()}"
                )
                by_id, ref_by_id = ids[row].argsort(), ref_ids[row].argsort()
                torch.testing.assert_close(
                    weights[row][by_id], ref_weights[row][ref_by_id], rtol=rtol, atol=atol
                )
                continue
            for e in swapped:
                assert torch.isclose(keys[row, e], kth, rtol=key_rtol, atol=0), (
                    f"row {row}: expert {e} (key {keys[row, e].item()!r}) swapped but the "
                    f"reference's k-th key is {kth.item()!r}: ids {ids[row].tolist()} vs "
                    f"{ref_ids[row].tolist()}"
                )
        same = ~differ
        torch.testing.assert_close(weights[same], ref_weights[same], rtol=rtol, atol=atol)
    else:
        torch.testing.assert_close(weights, ref_weights, rtol=rtol, atol=atol)
