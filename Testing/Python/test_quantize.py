"""The homogeneous spatial codebook: normalisation, nearest-neighbour search, eq. 2's stop-gradients, statistics."""
from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from einops import rearrange

from XctDiffCore.models.quantize import (
    HomogeneousQuantizer,
    brute_force_nearest,
    codebook_perplexity,
    codebook_utilisation,
    homogeneous_normalize,
    tree_nearest,
)


def _quantizer(k=16, c=4, beta=0.25, seed=0):
    torch.manual_seed(seed)
    return HomogeneousQuantizer(codebook_size=k, embedding_dim=c, beta=beta)


def test_normalize_is_zscore_per_vector():
    torch.manual_seed(0)  # unseeded, one draw in a few hundred missed the 1e-6 mean tolerance in float32
    v = torch.randn(5, 7) * 3 + 2
    n = homogeneous_normalize(v)
    torch.testing.assert_close(n.mean(-1), torch.zeros(5), atol=1e-6, rtol=0)
    torch.testing.assert_close(n.var(-1, unbiased=False), torch.ones(5), atol=1e-4, rtol=0)
    # invariant to per-vector affine changes with positive scale: the homogeneous property
    torch.testing.assert_close(homogeneous_normalize(v * 5 - 3), n, atol=1e-5, rtol=0)


@pytest.mark.parametrize("shape", [(2, 4, 3, 3, 3), (1, 4, 2, 5, 4)])
def test_forward_shapes_and_values(shape):
    q = _quantizer(c=shape[1])
    z_e = torch.randn(shape)
    z_q, loss, idx = q(z_e)
    b, c, d, h, w = shape
    assert z_q.shape == shape and idx.shape == (b, d, h, w) and idx.dtype == torch.int64
    assert loss.ndim == 0 and torch.isfinite(loss)
    # z_q holds exactly the normalised entries chosen, and lookup() gives them back
    torch.testing.assert_close(rearrange(z_q, "b c d h w -> b d h w c"), q.normalized_codebook()[idx])
    torch.testing.assert_close(q.lookup(idx), z_q)


def test_nearest_neighbour_matches_brute_force():
    q = _quantizer(k=64, c=8)
    z_e = torch.randn(2, 8, 4, 4, 4)
    _, _, idx = q(z_e)
    z_n = homogeneous_normalize(rearrange(z_e, "b c d h w -> (b d h w) c"))
    expected = torch.cdist(z_n, q.normalized_codebook()).argmin(1)
    assert torch.equal(idx.reshape(-1), expected)


def test_the_search_at_the_bundled_size_matches_every_distance():
    """8192 entries of 8 channels: the CPU's k-d tree and the blocked brute force find the codes cdist finds."""
    torch.manual_seed(1)
    q = _quantizer(k=8192, c=8)
    z_n = homogeneous_normalize(torch.randn(5000, 8))
    e_n = q.normalized_codebook()
    expected = torch.cat([torch.cdist(block.double(), e_n.double()).argmin(1) for block in z_n.split(1000)])
    for workers in (1, 3):
        assert torch.equal(tree_nearest(z_n, e_n, workers=workers), expected)
    with torch.inference_mode():  # as in the pipeline
        assert torch.equal(q.nearest(z_n, e_n), expected)
    assert torch.equal(brute_force_nearest(z_n, e_n, chunk=700), expected)  # blocks, the last one short
    with FlopCounterMode(display=False) as counter:  # the benchmark's counter sees the brute force's product
        brute_force_nearest(z_n, e_n, chunk=1000)
    assert counter.get_total_flops() == 2 * 5000 * 8192 * 8


def test_rows_that_are_not_finite_take_the_brute_force_search():
    """The tree refuses NaN rows; the search must not raise where every distance gives an answer."""
    q = _quantizer(k=64, c=8)
    z_n = homogeneous_normalize(torch.randn(10, 8))
    z_n[3] = float("nan")
    e_n = q.normalized_codebook()
    found = q.nearest(z_n, e_n)
    assert torch.equal(found, brute_force_nearest(z_n, e_n, chunk=4))
    finite = torch.arange(10) != 3
    assert torch.equal(found[finite], torch.cdist(z_n[finite], e_n).argmin(1))


def test_scale_does_not_win_the_search():
    """An entry that is a scaled/shifted copy of the input wins over a raw-closer one (homogeneity)."""
    q = _quantizer(k=2, c=4)
    target = torch.tensor([1.0, -2.0, 0.5, 3.0])
    with torch.no_grad():
        q.codebook[0] = target * 10 + 4  # far in raw distance, identical after N()
        q.codebook[1] = target + torch.tensor([0.3, 0.3, -0.3, 0.0])  # near in raw distance
    z_q, loss, idx = q(target.view(1, 4, 1, 1, 1))
    assert idx.item() == 0
    assert loss.item() < 1e-6


def _eq2_terms(q, z_e, idx):
    """Eq. 2 written out independently: (codebook term, commitment term) as functions of fresh leaves."""
    z_n = homogeneous_normalize(rearrange(z_e, "b c d h w -> (b d h w) c"))
    e_n = homogeneous_normalize(q.codebook)[idx.reshape(-1)]
    return ((z_n.detach() - e_n) ** 2).mean(), ((z_n - e_n.detach()) ** 2).mean()


def test_eq2_codebook_gets_only_first_term_encoder_only_beta_term():
    beta = 0.25
    q = _quantizer(k=8, c=4, beta=beta)
    z_e = torch.randn(1, 4, 2, 2, 3, requires_grad=True)
    _, loss, idx = q(z_e)
    loss.backward()
    got_code, got_z = q.codebook.grad.clone(), z_e.grad.clone()

    q.codebook.grad = None
    z = z_e.detach().clone().requires_grad_(True)
    term1, term2 = _eq2_terms(q, z, idx)
    exp_code = torch.autograd.grad(term1, q.codebook)[0]
    exp_z = torch.autograd.grad(beta * term2, z)[0]
    torch.testing.assert_close(got_code, exp_code)
    torch.testing.assert_close(got_z, exp_z)
    # the other cross-derivatives are stopped: term1 does not reach z, term2 does not reach the codebook
    term1, term2 = _eq2_terms(q, z, idx)
    assert not term1.requires_grad or torch.autograd.grad(term1, z, allow_unused=True)[0] is None
    assert torch.autograd.grad(term2, q.codebook, allow_unused=True)[0] is None
    assert got_code.abs().sum() > 0 and got_z.abs().sum() > 0


def test_eq2_beta_zero_leaves_encoder_without_loss_gradient():
    q = _quantizer(k=8, c=4, beta=0.0)
    z_e = torch.randn(1, 4, 2, 2, 2, requires_grad=True)
    _, loss, _ = q(z_e)
    loss.backward()
    assert torch.count_nonzero(z_e.grad) == 0
    assert q.codebook.grad.abs().sum() > 0


def test_eq2_numeric_value_on_constructed_case():
    """Two vectors, two entries, hand-computed loss: ||N(z)-N(e)||^2 averaged over all elements."""
    q = _quantizer(k=2, c=4, beta=0.5)
    with torch.no_grad():
        q.codebook.copy_(torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]))
    # z1 is an affine copy of entry 0 (exact match); z2 is closest to entry 1 but not equal
    z = torch.tensor([[3.0, 1.0, 1.0, 1.0], [0.0, 0.0, 1.0, 2.0]])
    z_e = rearrange(z, "(b n) c -> b c n () ()", b=1).contiguous().requires_grad_(True)
    _, loss, idx = q(z_e)
    assert idx.reshape(-1).tolist() == [0, 1]
    a = torch.tensor([0.0, 0.0, 1.0, 2.0])
    na = (a - a.mean()) / math.sqrt(a.var(unbiased=False) + 1e-5)
    e = torch.tensor([0.0, 0.0, 1.0, 1.0])
    ne = (e - e.mean()) / math.sqrt(e.var(unbiased=False) + 1e-5)
    mse = ((na - ne) ** 2).sum() / 8  # 2 vectors x 4 channels, the exact pair contributes 0
    torch.testing.assert_close(loss, (1 + 0.5) * mse, atol=1e-5, rtol=1e-5)


def test_straight_through_gradient_reaches_encoder_not_codebook():
    q = _quantizer(k=8, c=4)
    z_e = torch.randn(1, 4, 2, 3, 2, requires_grad=True)
    weight = torch.randn(1, 4, 2, 3, 2)
    z_q, _, _ = q(z_e)
    (weight * z_q).sum().backward()
    assert q.codebook.grad is None or torch.count_nonzero(q.codebook.grad) == 0
    z = z_e.detach().clone().requires_grad_(True)
    z_n = rearrange(homogeneous_normalize(rearrange(z, "b c d h w -> b d h w c")), "b d h w c -> b c d h w")
    expected = torch.autograd.grad((weight * z_n).sum(), z)[0]
    torch.testing.assert_close(z_e.grad, expected)


def test_forward_compiles_without_graph_breaks():
    q = _quantizer(k=16, c=4)
    compiled = torch.compile(q, backend="eager", fullgraph=True)
    z_e = torch.randn(1, 4, 2, 2, 2)
    z_q, loss, idx = compiled(z_e)
    ref = q(z_e)
    torch.testing.assert_close(z_q, ref[0])
    assert torch.equal(idx, ref[2])


def test_codebook_utilisation_and_perplexity_constructed():
    idx = torch.tensor([[0, 0], [1, 3]])
    assert codebook_utilisation(idx, 8) == pytest.approx(3 / 8)
    # usage 2:1:1 -> entropy 1.5 bits -> perplexity 2 ** 1.5
    assert codebook_perplexity(idx, 8) == pytest.approx(2 ** 1.5)
    uniform = torch.arange(16).repeat(3)
    assert codebook_utilisation(uniform, 16) == 1.0
    assert codebook_perplexity(uniform, 16) == pytest.approx(16.0)
    assert codebook_perplexity(torch.zeros(10, dtype=torch.long), 16) == pytest.approx(1.0)


def test_the_search_runs_in_fp32_under_bf16_autocast_and_with_bf16_rows():
    """Training under autocast may hand the search bf16 rows: both searches take them in fp32 (the brute
    force's reused fp32 block too, under autocast)."""
    torch.manual_seed(2)
    q = _quantizer(k=256, c=8)
    z_n = homogeneous_normalize(torch.randn(250, 8)).bfloat16()
    e_n = q.normalized_codebook()
    expected = torch.cdist(z_n.float(), e_n).argmin(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(q.nearest(z_n, e_n), expected)
        assert torch.equal(brute_force_nearest(z_n.float(), e_n, chunk=100), expected)  # three blocks
