"""Every loss against a slow, literal float64 transcription of its paper's formula: value and gradient."""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

from pipeline.losses import (
    barlow_twins,
    batch_hard_triplet,
    byol,
    dino_loss,
    info_nce,
    mined_triplet,
    moco_info_nce,
    sinkhorn_knopp,
    supcon,
    swav_loss,
    triplet,
    vicreg,
)

SHAPES = [(2, 3), (5, 16), (16, 32)]  # (batch, dim)
TEMPERATURES = [0.07, 0.5, 1.0]


def _inputs(n: int, d: int, count: int, seed: int, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype).requires_grad_() for _ in range(count)]


def _reference(ref_fn, inputs: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor | None]]:
    """Value and input gradients of the float64 reference."""
    ref_inputs = [x.detach().double().requires_grad_() for x in inputs]
    want = ref_fn(*ref_inputs)
    return want.detach(), list(torch.autograd.grad(want, ref_inputs, allow_unused=True))


def _check(
    loss_fn, ref_fn, inputs: list[torch.Tensor], rtol: float = 1e-9, atol: float = 1e-11, ref=None
) -> None:
    """loss_fn(*inputs) vs ref_fn(*inputs in float64) (or a precomputed `ref`): value and every gradient."""
    want, want_grads = ref if ref is not None else _reference(ref_fn, inputs)
    got = loss_fn(*inputs)
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol)
    got_grads = torch.autograd.grad(got, inputs, allow_unused=True)
    for g, w in zip(got_grads, want_grads, strict=True):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g.double(), w, rtol=rtol, atol=atol)


# ------------------------------------------------------------------------------------------ references


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sim(a, b) of one vector a (D,) with a vector or with every row of a matrix b (..., D)."""
    return (b @ a) / (a.norm() * b.norm(dim=-1))


def ref_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float) -> torch.Tensor:
    """SimCLR Algorithm 1: l(i, j) over all 2N anchors, sim = cosine, 1[k != i] in the denominator."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        others = [k for k in range(2 * n) if k != i]
        denominator = torch.exp(_cos(z[i], z[others]) / t).sum()
        total = total - torch.log(torch.exp(_cos(z[i], z[j]) / t) / denominator)
    return total / (2 * n)


def ref_moco_queue(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo Algorithm 1: logits [q.k+, q.queue] / t, cross-entropy with label 0."""
    total = 0.0
    for i in range(q.shape[0]):
        positive = torch.exp(_cos(q[i], k[i]) / t)
        negatives = torch.exp(_cos(q[i], queue) / t).sum()
        total = total - torch.log(positive / (positive + negatives))
    return total / q.shape[0]


def ref_moco_v3(q: torch.Tensor, k: torch.Tensor, t: float) -> torch.Tensor:
    """MoCo v3 Algorithm 1 (without the 2t factor): logits q @ k.T / t, labels = arange(N)."""
    total = 0.0
    for i in range(q.shape[0]):
        denominator = torch.exp(_cos(q[i], k) / t).sum()
        total = total - torch.log(torch.exp(_cos(q[i], k[i]) / t) / denominator)
    return total / q.shape[0]


def ref_supcon(z: torch.Tensor, labels: list[int], t: float) -> torch.Tensor:
    """SupCon eq. 2 (L_out), averaged over anchors that have at least one positive."""
    terms = []
    for i in range(z.shape[0]):
        others = [a for a in range(z.shape[0]) if a != i]
        positives = [p for p in others if labels[p] == labels[i]]
        if not positives:
            continue
        denominator = torch.exp(_cos(z[i], z[others]) / t).sum()
        s = sum(torch.log(torch.exp(_cos(z[i], z[p]) / t) / denominator) for p in positives)
        terms.append(-s / len(positives))
    return sum(terms) / len(terms)


def _dist(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(torch.clamp(((x - y) ** 2).sum(), min=1e-12))


def ref_triplet(a: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    return (
        sum(torch.relu(_dist(a[i], p[i]) - _dist(a[i], n[i]) + margin) for i in range(a.shape[0]))
        / a.shape[0]
    )


def ref_batch_hard(x: torch.Tensor, labels: list[int], margin: float) -> torch.Tensor:
    """Hermans et al. 2017 eq. 5: hardest positive and hardest negative per anchor."""
    terms = []
    for i in range(x.shape[0]):
        pos = [_dist(x[i], x[j]) for j in range(x.shape[0]) if j != i and labels[j] == labels[i]]
        neg = [_dist(x[i], x[j]) for j in range(x.shape[0]) if labels[j] != labels[i]]
        if pos and neg:
            terms.append(torch.relu(max(pos) - min(neg) + margin))
    return sum(terms) / len(terms)


def ref_barlow_twins(z1: torch.Tensor, z2: torch.Tensor, lambd: float) -> torch.Tensor:
    """Algorithm 1 with BatchNorm1d(affine=False) normalisation (biased variance + 1e-5), as in the code."""
    n, d = z1.shape

    def bn(z: torch.Tensor) -> torch.Tensor:
        mean = z.sum(0) / n
        var = ((z - mean) ** 2).sum(0) / n
        return (z - mean) / torch.sqrt(var + 1e-5)

    a, b = bn(z1), bn(z2)
    loss = 0.0
    for i in range(d):
        for j in range(d):
            c_ij = (a[:, i] * b[:, j]).sum() / n
            loss = loss + ((1 - c_ij) ** 2 if i == j else lambd * c_ij**2)
    return loss


def ref_vicreg(z1: torch.Tensor, z2: torch.Tensor, lam: float, mu: float, nu: float) -> torch.Tensor:
    """VICReg Algorithm 1, variance term halved as in the official main_vicreg.py."""
    n, d = z1.shape
    sim = ((z1 - z2) ** 2).sum() / (n * d)

    def std_term(z: torch.Tensor) -> torch.Tensor:
        mean = z.sum(0) / n
        std = torch.sqrt(((z - mean) ** 2).sum(0) / (n - 1) + 1e-4)
        return torch.relu(1 - std).sum() / d

    def cov_term(z: torch.Tensor) -> torch.Tensor:
        zc = z - z.sum(0) / n
        total = 0.0
        for i in range(d):
            for j in range(d):
                if i != j:
                    total = total + ((zc[:, i] * zc[:, j]).sum() / (n - 1)) ** 2
        return total / d

    std_loss = std_term(z1) / 2 + std_term(z2) / 2
    return lam * sim + mu * std_loss + nu * (cov_term(z1) + cov_term(z2))


def ref_byol(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """BYOL eq. 2: || p/||p|| - z/||z|| ||^2, target detached."""
    z = z.detach()
    return sum(((p[i] / p[i].norm() - z[i] / z[i].norm()) ** 2).sum() for i in range(p.shape[0])) / p.shape[0]


def _ref_debiased_term(pos: torch.Tensor, neg: torch.Tensor, t: float, tau_plus: float, beta: float | None):
    """The official code of Chuang et al. 2020 (beta None) and Robinson et al. 2021 (beta), one anchor
    with positive pos and its K negatives neg (K,), both exp(cos / t):
    Ng = clamp((-tau+ K pos + sum) / (1 - tau+), min=K e^{-1/t}), sum re-weighted by neg^beta / mean."""
    k = neg.shape[0]
    if beta is None:
        neg_sum = neg.sum()
    else:
        imp = (beta * neg.log()).exp()
        neg_sum = (imp * neg).sum() / imp.mean()
    ng = torch.clamp((-tau_plus * k * pos + neg_sum) / (1 - tau_plus), min=k * math.e ** (-1 / t))
    return -torch.log(pos / (pos + ng))


def ref_debiased_nt_xent(z1: torch.Tensor, z2: torch.Tensor, t: float, tau_plus: float, beta: float | None):
    """Every anchor of SimCLR's 2N views: the other view is the positive, the 2N - 2 others negatives."""
    z = torch.cat([z1, z2])
    n = z1.shape[0]
    total = 0.0
    for i in range(2 * n):
        j = (i + n) % (2 * n)
        pos = torch.exp(_cos(z[i], z[j]) / t)
        neg = torch.exp(_cos(z[i], z[[c for c in range(2 * n) if c not in (i, j)]]) / t)
        total = total + _ref_debiased_term(pos, neg, t, tau_plus, beta)
    return total / (2 * n)


def ref_debiased_moco(q: torch.Tensor, k: torch.Tensor, queue, t: float, tau_plus: float, beta: float | None):
    """Every query of MoCo: its own key is the positive; the K queued keys are the negatives, without a
    queue the other N - 1 keys of the batch."""
    n = q.shape[0]
    total = 0.0
    for i in range(n):
        pos = torch.exp(_cos(q[i], k[i]) / t)
        others = queue if queue is not None else k[[c for c in range(n) if c != i]]
        total = total + _ref_debiased_term(pos, torch.exp(_cos(q[i], others) / t), t, tau_plus, beta)
    return total / n


def ref_mined_triplet(a: torch.Tensor, p: torch.Tensor, margin: float, mining: str) -> torch.Tensor:
    """Per anchor a_i: positive p_i, negatives both views of every other image; hard = nearest,
    semi-hard = nearest farther than the positive (else the farthest)."""
    n = a.shape[0]
    views, image = torch.cat([a, p]), list(range(n)) * 2
    total = 0.0
    for i in range(n):
        d_ap = _dist(a[i], p[i])
        negatives = [_dist(a[i], views[c]) for c in range(2 * n) if image[c] != i]
        if mining == "hard":
            d_an = min(negatives)
        else:
            farther = [d for d in negatives if d > d_ap]
            d_an = min(farther) if farther else max(negatives)
        total = total + torch.relu(d_ap - d_an + margin)
    return total / n


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max())
    return e / e.sum()


def ref_dino(student: list, teacher: list, center: torch.Tensor, ts: float, tt: float) -> torch.Tensor:
    """DINO Algorithm 1: H(t, s) = -sum softmax((t - C) / tt) log softmax(s / ts), over pairs v != g."""
    terms = []
    for g, t in enumerate(teacher):
        for v, s in enumerate(student):
            if v == g:
                continue
            h = 0.0
            for b in range(s.shape[0]):
                target = _softmax((t[b].detach() - center) / tt)
                h = h - (target * torch.log(_softmax(s[b] / ts))).sum()
            terms.append(h / s.shape[0])
    return sum(terms) / len(terms)


def ref_sinkhorn(scores: torch.Tensor, eps: float, iterations: int) -> torch.Tensor:
    """SwAV Algorithm (Appendix A.1): Q = exp(C^T Z / eps), then alternately rows to 1/K, columns to 1/B."""
    b, k = scores.shape
    q = [[math.exp(scores[i, j].item() / eps) for i in range(b)] for j in range(k)]  # K rows x B columns
    total = sum(map(sum, q))
    q = [[x / total for x in row] for row in q]
    for _ in range(iterations):
        q = [[x / sum(row) / k for x in row] for row in q]
        columns = [sum(q[j][i] for j in range(k)) for i in range(b)]
        q = [[q[j][i] / columns[i] / b for i in range(b)] for j in range(k)]
    return torch.tensor([[q[j][i] * b for j in range(k)] for i in range(b)], dtype=torch.float64)


def ref_swav(scores: list, codes: list, t: float) -> torch.Tensor:
    """Swapped prediction: for each global crop g, the other crops' -sum q log softmax(s / t), averaged."""
    loss = 0.0
    for g, q in enumerate(codes):
        sub = 0.0
        for v, s in enumerate(scores):
            if v != g:
                per_sample = [-(q[b] * torch.log(_softmax(s[b] / t))).sum() for b in range(s.shape[0])]
                sub = sub + sum(per_sample) / s.shape[0]
        loss = loss + sub / (len(scores) - 1)
    return loss / len(codes)


# --------------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize(("shape", "t"), list(itertools.product(SHAPES, TEMPERATURES)))
def test_info_nce_matches_reference(shape: tuple[int, int], t: float) -> None:
    n, d = shape
    z1, z2 = _inputs(n, d, 2, seed=n * 100 + d)
    ref = _reference(lambda a, b: ref_nt_xent(a, b, t), [z1, z2])
    chunks = (None, 1, 3, 7, 64) if n <= 5 else (None, 5, 7, 64)  # 1 x 1 blocks are slow at larger n
    for chunk in chunks:
        _check(lambda a, b, c=chunk: info_nce(a, b, temperature=t, chunk_size=c), None, [z1, z2], ref=ref)


def test_info_nce_float32_and_gather_without_group_match_reference() -> None:
    z1, z2 = _inputs(12, 16, 2, seed=3, dtype=torch.float32)
    ref = _reference(lambda a, b: ref_nt_xent(a, b, 0.1), [z1, z2])
    for chunk in (None, 5):
        loss_fn = lambda a, b, c=chunk: info_nce(a, b, temperature=0.1, gather=True, chunk_size=c)  # noqa: E731
        _check(loss_fn, None, [z1, z2], rtol=1e-5, atol=1e-6, ref=ref)


def test_chunked_info_nce_stays_finite_at_extreme_similarity() -> None:
    """Identical views at t = 0.01: logits of 100 must not overflow the blockwise log-sum-exp."""
    z = torch.randn(9, 4, dtype=torch.float32)
    z1, z2 = z.clone().requires_grad_(), z.clone().requires_grad_()
    full = info_nce(z1, z2, temperature=0.01)
    chunked = info_nce(z1, z2, temperature=0.01, chunk_size=2)
    torch.testing.assert_close(chunked, full)
    (g_full,) = torch.autograd.grad(full, z1)
    (g_chunked,) = torch.autograd.grad(chunked, z1)
    assert torch.isfinite(g_chunked).all()
    torch.testing.assert_close(g_chunked, g_full, rtol=1e-5, atol=1e-6)


def test_losses_under_bf16_autocast_compute_in_fp32() -> None:
    """bf16 embeddings from an autocast matmul give the float64 reference on those same bf16 values."""
    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(8, 16)
    x1, x2, x3 = (torch.randn(16, 8, generator=g) for _ in range(3))
    labels = torch.arange(16) % 4
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z1, z2, z3 = layer(x1), layer(x2), layer(x3)
        assert z1.dtype == torch.bfloat16
        got = {
            "info_nce": info_nce(z1, z2, temperature=0.07),
            "info_nce_chunked": info_nce(z1, z2, temperature=0.07, chunk_size=16),
            "moco_v3": moco_info_nce(z1, z2, temperature=0.07),
            "supcon": supcon(z1, labels, 0.07),
            "barlow_twins": barlow_twins(z1, z2),
            "vicreg": vicreg(z1, z2),
            "byol": byol(z1, z2),
            "triplet": triplet(z1, z2, z3, 0.2),
        }
    a, b, c = (z.detach().double() for z in (z1, z2, z3))
    nt_xent = ref_nt_xent(a, b, 0.07)
    want = {
        "info_nce": nt_xent,
        "info_nce_chunked": nt_xent,
        "moco_v3": ref_moco_v3(a, b, 0.07),
        "supcon": ref_supcon(a, labels.tolist(), 0.07),
        "barlow_twins": ref_barlow_twins(a, b, 0.0051),
        "vicreg": ref_vicreg(a, b, 25.0, 25.0, 1.0),
        "byol": ref_byol(a, b),
        "triplet": ref_triplet(a, b, c, 0.2),
    }
    want["barlow_twins"] = barlow_twins(a, b)  # the loss itself in float64, checked against the loop above
    torch.testing.assert_close(
        barlow_twins(a[:, :16], b[:, :16]), ref_barlow_twins(a[:, :16], b[:, :16], 0.0051)
    )
    for name, loss in got.items():
        assert loss.dtype == torch.float32, name
        torch.testing.assert_close(loss.double(), want[name], rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize(("shape", "t"), [((3, 8), 0.07), ((8, 16), 0.2), ((5, 4), 1.0)])
def test_moco_info_nce_with_queue_matches_reference(shape: tuple[int, int], t: float) -> None:
    n, d = shape
    q, k = _inputs(n, d, 2, seed=n + d)
    queue = torch.randn(11, d, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    _check(
        lambda a, b: moco_info_nce(a, b, queue, temperature=t),
        lambda a, b: ref_moco_queue(a, b, queue, t),
        [q, k],
    )


@pytest.mark.parametrize(("shape", "t"), [((3, 8), 0.07), ((8, 16), 0.2)])
def test_moco_info_nce_without_queue_is_moco_v3(shape: tuple[int, int], t: float) -> None:
    q, k = _inputs(*shape, 2, seed=1)
    _check(lambda a, b: moco_info_nce(a, b, temperature=t), lambda a, b: ref_moco_v3(a, b, t), [q, k])


@pytest.mark.parametrize(("n", "d", "classes", "t"), [(6, 4, 2, 0.07), (16, 8, 5, 0.1), (9, 16, 9, 0.5)])
def test_supcon_matches_reference(n: int, d: int, classes: int, t: float) -> None:
    g = torch.Generator().manual_seed(n)
    labels = torch.randint(0, classes, (n,), generator=g)
    (z,) = _inputs(n, d, 1, seed=n)
    _check(lambda a: supcon(a, labels, temperature=t), lambda a: ref_supcon(a, labels.tolist(), t), [z])
    # (N, V, D) multi-view form: views are positives of each other even for singleton labels.
    (zv,) = [torch.randn(n, 2, d, dtype=torch.float64, generator=g).requires_grad_()]
    flat_labels = labels.repeat(2).tolist()
    _check(
        lambda a: supcon(a, labels, temperature=t),
        lambda a: ref_supcon(a.transpose(0, 1).reshape(-1, d), flat_labels, t),
        [zv],
    )


@pytest.mark.parametrize(("shape", "margin"), [((4, 3), 0.2), ((16, 8), 1.0), ((7, 32), 5.0)])
def test_triplet_matches_reference(shape: tuple[int, int], margin: float) -> None:
    _check(
        lambda a, p, n: triplet(a, p, n, margin=margin),
        lambda a, p, n: ref_triplet(a, p, n, margin),
        _inputs(*shape, 3, seed=shape[0]),
    )


@pytest.mark.parametrize(("n", "d", "classes", "margin"), [(8, 4, 2, 0.2), (16, 8, 4, 1.0), (12, 16, 3, 3.0)])
def test_batch_hard_triplet_matches_reference(n: int, d: int, classes: int, margin: float) -> None:
    labels = torch.arange(n) % classes
    _check(
        lambda x: batch_hard_triplet(x, labels, margin=margin),
        lambda x: ref_batch_hard(x, labels.tolist(), margin),
        _inputs(n, d, 1, seed=n + d),
        rtol=1e-7,
        atol=1e-9,  # the (N, N) distances use |x|^2 + |y|^2 - 2 x.y, the reference direct differences
    )


def test_batch_hard_triplet_ignores_anchors_without_positive_or_negative() -> None:
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    labels = torch.tensor([0, 0, 1, 1, 2])  # anchor 4 has no positive
    _check(
        lambda a: batch_hard_triplet(a, labels, 0.5), lambda a: ref_batch_hard(a, labels.tolist(), 0.5), [x]
    )
    single_class = batch_hard_triplet(x, torch.zeros(5, dtype=torch.long), 0.5)
    assert single_class.item() == 0.0 and single_class.requires_grad


@pytest.mark.parametrize(("shape", "lambd"), [((4, 3), 0.0051), ((16, 8), 0.0051), ((9, 12), 0.5)])
def test_barlow_twins_matches_reference(shape: tuple[int, int], lambd: float) -> None:
    _check(
        lambda a, b: barlow_twins(a, b, lambd=lambd),
        lambda a, b: ref_barlow_twins(a, b, lambd),
        _inputs(*shape, 2, seed=shape[1]),
    )


@pytest.mark.parametrize(
    ("shape", "weights"),
    [((4, 3), (25.0, 25.0, 1.0)), ((16, 8), (25.0, 25.0, 1.0)), ((9, 5), (1.0, 2.0, 3.0))],
)
def test_vicreg_matches_reference(shape: tuple[int, int], weights: tuple[float, float, float]) -> None:
    lam, mu, nu = weights
    z1, z2 = _inputs(*shape, 2, seed=shape[0])
    with torch.no_grad():  # std below 1 in some dimensions so the hinge is active there
        z1[:, 0] *= 0.1
        z2[:, 1] *= 0.3
    _check(
        lambda a, b: vicreg(a, b, sim_weight=lam, var_weight=mu, cov_weight=nu),
        lambda a, b: ref_vicreg(a, b, lam, mu, nu),
        [z1, z2],
    )


@pytest.mark.parametrize("shape", [(2, 3), (16, 8), (7, 64)])
def test_byol_matches_reference_and_stops_the_target_gradient(shape: tuple[int, int]) -> None:
    p, z = _inputs(*shape, 2, seed=shape[1])
    _check(byol, ref_byol, [p, z])
    byol(p, z).backward()
    assert z.grad is None and p.grad is not None


def test_losses_reject_mismatched_shapes() -> None:
    with pytest.raises(ValueError, match="info_nce"):
        info_nce(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match="queue"):
        moco_info_nce(torch.randn(4, 3), torch.randn(4, 3), torch.randn(3, 10))
    with pytest.raises(ValueError, match="chunk_size"):
        info_nce(torch.randn(4, 3), torch.randn(4, 3), chunk_size=0)
    with pytest.raises(ValueError, match="moco_info_nce: negatives must be one of"):
        moco_info_nce(torch.randn(4, 3), torch.randn(4, 3), negatives="hardest")
    with pytest.raises(ValueError, match="at least one negative"):  # one query, no queue: only its own key
        moco_info_nce(torch.randn(1, 3), torch.randn(1, 3), negatives="debiased")
    assert math.isfinite(info_nce(torch.randn(4, 3), torch.randn(4, 3)).item())


def test_loss_bench_variants_agree(capsys: pytest.CaptureFixture[str]) -> None:
    """`python -m bench loss` rows: the three implementations give one value; a rank's share runs too."""
    from bench.loss import main

    assert main(["--pairs", "64", "--repeats", "1", "--chunk-size", "32"]) == 0
    assert main(["--pairs", "64", "--repeats", "1", "--world", "4", "--variants", "local", "chunked"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["variant"], r["world"]) for r in rows] == [
        ("naive", 1), ("local", 1), ("chunked", 1), ("local", 4), ("chunked", 4)
    ]  # fmt: skip
    assert (
        rows[0]["value"]
        == pytest.approx(rows[1]["value"], rel=1e-5)
        == pytest.approx(rows[2]["value"], rel=1e-5)
    )
    assert rows[3]["value"] == pytest.approx(rows[4]["value"], rel=1e-5)
    assert all(r["ms"] > 0 and r["peak_mib"] >= 0 for r in rows)


@pytest.mark.parametrize(
    ("shape", "t", "tau_plus"), [((4, 8), 0.5, 0.1), ((8, 16), 0.2, 0.05), ((6, 4), 1.0, 0.4)]
)
def test_debiased_and_hard_negatives_match_their_papers_code(
    shape: tuple[int, int], t: float, tau_plus: float
) -> None:
    z1, z2 = _inputs(*shape, 2, seed=shape[0] + shape[1])
    for negatives, beta in (("debiased", None), ("hard", 0.5), ("hard", 1.0)):
        _check(
            lambda a, b, n=negatives, w=beta or 1.0: info_nce(
                a, b, t, negatives=n, tau_plus=tau_plus, beta=w
            ),
            lambda a, b, w=beta: ref_debiased_nt_xent(a, b, t, tau_plus, w),
            [z1, z2],
        )
    # No class prior and no weighting: NT-Xent.
    plain = info_nce(z1, z2, t)
    torch.testing.assert_close(info_nce(z1, z2, t, negatives="debiased", tau_plus=0.0), plain)
    torch.testing.assert_close(info_nce(z1, z2, t, negatives="hard", tau_plus=0.0, beta=0.0), plain)


@pytest.mark.parametrize(
    ("shape", "queue_size", "t", "tau_plus"),
    [((3, 8), 11, 0.07, 0.1), ((8, 16), 5, 0.2, 0.05), ((5, 4), None, 1.0, 0.4), ((16, 8), None, 0.5, 0.1)],
)
def test_moco_debiased_and_hard_negatives_match_their_papers_code(
    shape: tuple[int, int], queue_size: int | None, t: float, tau_plus: float
) -> None:
    n, d = shape
    q, k = _inputs(n, d, 2, seed=n + d)
    g = torch.Generator().manual_seed(7)
    queue = None if queue_size is None else torch.randn(queue_size, d, dtype=torch.float64, generator=g)
    for negatives, beta in (("debiased", None), ("hard", 0.5), ("hard", 2.0)):
        _check(
            lambda a, b, n=negatives, w=beta or 1.0: moco_info_nce(
                a, b, queue, t, negatives=n, tau_plus=tau_plus, beta=w
            ),
            lambda a, b, w=beta: ref_debiased_moco(a, b, queue, t, tau_plus, w),
            [q, k],
        )
    # No class prior and no weighting: MoCo's InfoNCE.
    plain = moco_info_nce(q, k, queue, t)
    torch.testing.assert_close(moco_info_nce(q, k, queue, t, negatives="debiased", tau_plus=0.0), plain)
    torch.testing.assert_close(moco_info_nce(q, k, queue, t, negatives="hard", tau_plus=0.0, beta=0.0), plain)


def test_debiased_floor_is_reached_and_extreme_weights_stay_finite() -> None:
    z = torch.randn(6, 8, dtype=torch.float64)
    z1, z2 = z.clone().requires_grad_(), (z + 0.01).requires_grad_()  # positives far above every negative
    _check(
        lambda a, b: info_nce(a, b, 0.5, negatives="debiased", tau_plus=0.5),
        lambda a, b: ref_debiased_nt_xent(a, b, 0.5, 0.5, None),
        [z1, z2],
    )
    loss = info_nce(z1.float(), z2.float(), 0.02, negatives="hard", beta=5.0)  # n^6 = e^300: log space
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z1.grad).all()
    with pytest.raises(ValueError, match="chunk_size"):
        info_nce(z1, z2, negatives="hard", chunk_size=4)


@pytest.mark.parametrize(("shape", "margin"), [((4, 3), 0.2), ((9, 8), 0.5), ((6, 16), 2.0)])
def test_mined_triplet_matches_reference(shape: tuple[int, int], margin: float) -> None:
    a, p = _inputs(*shape, 2, seed=shape[0])
    for mining in ("hard", "semi-hard"):
        _check(
            lambda x, y, m=mining: mined_triplet(x, y, margin, m),
            lambda x, y, m=mining: ref_mined_triplet(x, y, margin, m),
            [a, p],
            rtol=1e-7,
            atol=1e-9,  # |x|^2 + |y|^2 - 2 x.y against direct differences, as batch hard
        )
    with pytest.raises(ValueError, match="mining"):
        mined_triplet(a, p, mining="easy")


@pytest.mark.parametrize(("crops", "ts", "tt"), [(2, 0.1, 0.04), (4, 0.1, 0.07), (3, 0.5, 1.0)])
def test_dino_loss_matches_reference(crops: int, ts: float, tt: float) -> None:
    outputs = _inputs(5, 12, crops + 2, seed=crops)
    student, teacher = outputs[:crops], outputs[crops:]
    center = torch.randn(12, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    _check(
        lambda *x: dino_loss(list(x[:crops]), list(x[crops:]), center, ts, tt),
        lambda *x: ref_dino(list(x[:crops]), list(x[crops:]), center, ts, tt),
        outputs,
    )
    torch.testing.assert_close(
        dino_loss(student, teacher, center, ts, torch.tensor(tt, dtype=torch.float64)),
        dino_loss(student, teacher, center, ts, tt),
    )


@pytest.mark.parametrize(("b", "k", "eps"), [(6, 4, 0.05), (5, 9, 0.5), (8, 3, 1.0)])
def test_sinkhorn_and_swav_loss_match_reference(b: int, k: int, eps: float) -> None:
    scores = torch.randn(b, k, dtype=torch.float64, generator=torch.Generator().manual_seed(b)).tanh()
    codes = sinkhorn_knopp(scores, eps, iterations=3)
    torch.testing.assert_close(codes, ref_sinkhorn(scores, eps, 3), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(codes.sum(dim=1), torch.ones(b, dtype=torch.float64))  # the last step
    many = sinkhorn_knopp(scores, eps, iterations=200)
    torch.testing.assert_close(many.sum(dim=0), torch.full((k,), b / k, dtype=torch.float64))  # equipartition

    crops = _inputs(b, k, 4, seed=k)
    code_list = [sinkhorn_knopp(c.detach(), eps) for c in crops[:2]]
    _check(lambda *s: swav_loss(list(s), code_list, 0.1), lambda *s: ref_swav(list(s), code_list, 0.1), crops)
