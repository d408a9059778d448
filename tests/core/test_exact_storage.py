"""tensors.exact_storage: the same values, outside autograd, in a tensor whose storage holds exactly
them (what torch.save writes of it), for whole tensors, views and lazily flagged ones."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from dcp_forge._torch_compat import negative_view
from dcp_forge.core.tensors import exact_storage, math_bits, raw_view


@settings(max_examples=80, deadline=None)
@given(st.integers(1, 6), st.integers(1, 6), st.sampled_from(["whole", "row", "column", "transposed", "conj", "neg"]),
       st.booleans())
def test_exact_storage_keeps_values_and_flags_and_holds_only_them(rows: int, cols: int, view: str, grad: bool) -> None:
    dtype = torch.complex64 if view == "conj" else torch.float32
    base = torch.randn(rows, cols, dtype=dtype, requires_grad=grad and view != "neg")
    tensor = {"whole": base, "row": base[rows // 2], "column": base[:, cols // 2], "transposed": base.t(),
              "conj": base.conj(), "neg": negative_view(base) if view == "neg" else base}[view]
    out = exact_storage(tensor)
    assert not out.requires_grad
    assert math_bits(out) == math_bits(tensor)
    assert torch.equal(raw_view(out), raw_view(tensor.detach()))
    assert out.untyped_storage().nbytes() == out.nbytes
