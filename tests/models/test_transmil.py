"""TransMIL's pieces: the Moore-Penrose iteration, Nyström attention, the squared token grid."""

from __future__ import annotations

import pytest
import torch

from aem_dist.config import model_options
from aem_dist.models import build_model
from aem_dist.models.transmil import NystromAttention, iterative_pinv


def test_iterative_pinv_converges_to_the_pseudo_inverse():
    g = torch.Generator().manual_seed(0)
    x = torch.softmax(torch.randn(3, 8, 8, generator=g, dtype=torch.float64), dim=-1)
    torch.testing.assert_close(iterative_pinv(x, 30), torch.linalg.pinv(x), atol=1e-8, rtol=1e-8)


def test_nystrom_with_one_landmark_per_token_approximates_exact_attention():
    torch.manual_seed(0)
    n, dim, heads = 12, 16, 4
    att = NystromAttention(dim, heads, landmarks=n).double()
    x = torch.randn(n, dim, dtype=torch.float64)
    with torch.no_grad():
        q, k, v = (t.reshape(n, heads, -1).transpose(0, 1) for t in att.to_qkv(x).chunk(3, dim=-1))
        exact = torch.softmax(q @ k.transpose(-1, -2) / (dim // heads) ** 0.5, dim=-1) @ v + att.res_conv(v.unsqueeze(0)).squeeze(0)
        exact = att.to_out(exact.transpose(0, 1).reshape(n, -1))
        out = att(x)
    # six pseudo-inverse iterations (as TransMIL uses) leave a small approximation error
    assert float((out - exact).abs().max()) < 0.05 * float(exact.abs().max())


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 10, 17])
def test_any_bag_size_forms_a_square_grid(n):
    torch.manual_seed(0)
    model = build_model(model_options("transmil")(name="transmil", hidden=8, n_heads=2), 3, 2).double().eval()
    out = model(torch.randn(n, 3, dtype=torch.float64), torch.zeros(n, dtype=torch.long), 1)
    assert out.logits.shape == (1, 2) and torch.isfinite(out.logits).all()
    assert out.attn_scores is None and out.instance_attention(torch.zeros(n, dtype=torch.long), 1) is None
