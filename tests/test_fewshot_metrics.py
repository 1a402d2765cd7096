"""Alignment metrics against brute-force float64 programs written here, cell by cell.

The brute-force OTAM follows the recurrence of the issue literally (one Python step per cell
and per pair), so the vectorised wavefront is checked for values and, through autograd on the
brute force and gradcheck, for gradients.
"""

import pytest
import torch

from stadapter.fewshot.metrics import METRICS, TRX, bi_mhm, build_metric, frame_costs, mean_cosine, otam


def cosine_cost(a, b):
    return 1 - torch.dot(a, b) / (a.norm() * b.norm())


def softmin(values, lam):
    return -lam * torch.log(sum(torch.exp(-v / lam) for v in values))


def brute_otam_one_way(rows, cols, lam):
    """rows (Tq, D), cols (Tp, D): G(Tq-1, Tp+1) by the literal recurrence."""
    tq, tp = rows.shape[0], cols.shape[0]
    zero = rows.new_zeros(())
    cost = [[zero] + [cosine_cost(rows[l], cols[m]) for m in range(tp)] + [zero] for l in range(tq)]
    last = tp + 1
    g = [[None] * (tp + 2) for _ in range(tq)]
    for m in range(tp + 2):
        g[0][m] = cost[0][m] + (g[0][m - 1] if m else zero)
    for l in range(1, tq):
        g[l][0] = g[l - 1][0] + cost[l][0]
        g[l][1] = cost[l][1] + softmin([g[l - 1][0], g[l][0], g[l - 1][1]], lam)
        for m in range(2, last):
            g[l][m] = cost[l][m] + softmin([g[l - 1][m - 1], g[l][m - 1]], lam)
        g[l][last] = cost[l][last] + softmin([g[l - 1][last - 1], g[l][last - 1], g[l - 1][last]], lam)
    return g[tq - 1][last]


def brute_otam(query, protos, lam, bidirectional):
    rows = []
    for q in range(query.shape[0]):
        row = []
        for k in range(protos.shape[0]):
            d = brute_otam_one_way(query[q], protos[k], lam)
            if bidirectional:
                d = d + brute_otam_one_way(protos[k], query[q], lam)
            row.append(d)
        rows.append(torch.stack(row))
    return torch.stack(rows)


def brute_bi_mhm(query, protos):
    out = []
    for q in query:
        row = []
        for p in protos:
            to_p = torch.stack([min(cosine_cost(a, b) for b in p) for a in q]).mean()
            to_q = torch.stack([min(cosine_cost(a, b) for a in q) for b in p]).mean()
            row.append(to_p + to_q)
        out.append(torch.stack(row))
    return torch.stack(out)


def inputs(q, k, tq, tp, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    query = torch.randn(q, tq, d, generator=g, dtype=torch.float64, requires_grad=True)
    protos = torch.randn(k, tp, d, generator=g, dtype=torch.float64, requires_grad=True)
    return query, protos


@pytest.mark.parametrize("lam", [0.5, 0.1, 2.0])
@pytest.mark.parametrize("bidirectional", [True, False])
@pytest.mark.parametrize("tq,tp", [(4, 4), (1, 3), (5, 2), (8, 8)])
def test_otam_matches_brute_force_values_and_gradients(lam, bidirectional, tq, tp):
    query, protos = inputs(3, 2, tq, tp, 6, seed=tq * 10 + tp)
    got = otam(query, protos, lam=lam, bidirectional=bidirectional)
    want = brute_otam(query, protos, lam, bidirectional)
    assert got.shape == (3, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    weights = torch.randn_like(want)
    got_grads = torch.autograd.grad((got * weights).sum(), (query, protos))
    want_grads = torch.autograd.grad((want * weights).sum(), (query, protos))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)


def test_otam_gradcheck():
    query, protos = inputs(2, 3, 4, 5, 3, seed=7)
    assert torch.autograd.gradcheck(lambda q, p: otam(q, p, lam=0.3), (query, protos))


def test_otam_float32_is_finite_and_close_to_float64():
    query, protos = inputs(4, 5, 8, 8, 16, seed=3)
    want = otam(query, protos)
    got = otam(query.float().detach().requires_grad_(), protos.float())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


def test_otam_prefers_the_same_video_in_order_over_reversed():
    query, _ = inputs(1, 1, 8, 8, 16, seed=5)
    same, reversed_ = query.detach(), query.detach().flip(1)
    distance = otam(query.detach(), torch.cat([same, reversed_]), lam=0.05)
    assert distance[0, 0] < distance[0, 1]


@pytest.mark.parametrize("tq,tp", [(4, 4), (3, 6)])
def test_bi_mhm_matches_brute_force(tq, tp):
    query, protos = inputs(3, 4, tq, tp, 5, seed=11)
    got = bi_mhm(query, protos)
    want = brute_bi_mhm(query, protos)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    got_grads = torch.autograd.grad(got.sum(), (query, protos))
    want_grads = torch.autograd.grad(want.sum(), (query, protos))
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(bi_mhm, (query, protos))


def test_mean_cosine_is_one_minus_cosine_of_time_means():
    query, protos = inputs(2, 3, 4, 6, 5, seed=2)
    got = mean_cosine(query, protos)
    for q in range(2):
        for k in range(3):
            want = cosine_cost(query[q].mean(0), protos[k].mean(0))
            torch.testing.assert_close(got[q, k], want)


def test_frame_costs_shape_and_bad_input():
    query, protos = inputs(2, 3, 4, 6, 5)
    assert frame_costs(query, protos).shape == (2, 3, 4, 6)
    with pytest.raises(ValueError, match="query must be a \\(videos, frames, dim\\)"):
        otam(query[0], protos)
    with pytest.raises(ValueError, match="feature dim"):
        bi_mhm(query, protos[..., :4])
    with pytest.raises(ValueError, match="lam must be > 0"):
        otam(query, protos, lam=0)


def trx(dim=8, **kwargs):
    torch.manual_seed(0)
    return TRX(dim, hidden=16, **kwargs).eval()


def test_trx_shapes_and_cardinalities():
    model = trx(cardinalities=(1, 2, 3))
    query, support = torch.randn(5, 6, 8), torch.randn(4, 6, 8)
    assert model(query, support).shape == (5, 4)
    assert model(query, support.unsqueeze(1).expand(4, 3, 6, 8)).shape == (5, 4)
    with pytest.raises(ValueError, match="at least 3 frames"):
        model(query[:, :2], support[:, :2])
    with pytest.raises(ValueError, match="TRX expects query"):
        model(query, support[..., :7])


def test_trx_permutations():
    model = trx()
    query, support = torch.randn(5, 6, 8), torch.randn(4, 3, 6, 8)
    base = model(query, support)
    q_perm, k_perm, s_perm = torch.randperm(5), torch.randperm(4), torch.tensor([2, 0, 1])
    torch.testing.assert_close(model(query[q_perm], support), base[q_perm])
    torch.testing.assert_close(model(query, support[k_perm]), base[:, k_perm])
    # A class pools its shots' tuples: their order does not matter.
    torch.testing.assert_close(model(query, support[:, s_perm]), base)
    # The frame order does: tuples are ordered and position-coded.
    assert not torch.allclose(model(query.flip(1), support), base)


def test_trx_one_query_at_a_time_equals_batched_and_trains():
    model = trx()
    query, support = torch.randn(3, 5, 8), torch.randn(2, 5, 8, requires_grad=True)
    batched = model(query, support)
    for q in range(3):
        torch.testing.assert_close(model(query[q:q + 1], support), batched[q:q + 1])
    batched.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    assert support.grad is not None


def test_build_metric_by_name():
    query, protos = torch.randn(3, 4, 8), torch.randn(2, 4, 8)
    for name in METRICS:
        metric = build_metric(name, 8)
        assert metric(query, protos).shape == (3, 2)
    torch.testing.assert_close(build_metric("otam", 8, lam=0.2)(query, protos), otam(query, protos, lam=0.2))
    with pytest.raises(ValueError, match="metric must be one of"):
        build_metric("dtw", 8)
