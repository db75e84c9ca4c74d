"""NNCLR, SimSiam and DCL/DCLW: their losses against float64 transcriptions of the papers' pseudo-code,
each method's assembly of the two-view loss, NNCLR's support set over three steps under 2 gloo ranks
against one process, SwAV's delayed queue start across a resume, and each method end to end under both
engines with the CPU and DALI loaders (the torch loader runs every registered method in
tests/test_data_torch.py; one step of every method under 2 ranks is in tests/test_methods.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_methods import VIT  # LayerNorm only: a rank's forward is independent of the others'

from pipeline.distributed import all_reduce_mean
from pipeline.losses import dcl, nearest_neighbours, nnclr, simsiam
from pipeline.losses.dcl import vmf_weights
from pipeline.methods import METHODS
from pipeline.methods.config import DCLConfig, NNCLRConfig, SimSiamConfig, SwAVConfig
from pipeline.models import HeadConfig, ModelConfig

from ranks import run_ranks

ROOT = Path(__file__).resolve().parents[1]
TINY = ModelConfig(backbone="tiny", projector=HeadConfig(hidden_dim=32, output_dim=16))
SHAPES = [(2, 3), (5, 8), (16, 32)]  # (N, D)


def _views(b: int = 8, size: int = 32, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, 3, size, size, generator=g) for _ in range(2)]


def _leaves(*shapes: tuple[int, ...], seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_() for s in shapes]


def _grads(loss: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """d loss / d leaf for each leaf, zeros where none reaches it."""
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]


# ------------------------------------------------------------------- the papers' pseudo-code, in float64

SMALL_NUM = math.log(1e-45)  # the DCL code's mask: exp(SMALL_NUM + s) vanishes next to every negative


def dcl_one_way(z1, z2, temperature, weight_fn=None):
    """Yeh et al.'s DCL pseudo-code (one direction), on normalised z1, z2."""
    cross_view_distance = torch.mm(z1, z2.t())
    positive_loss = -torch.diag(cross_view_distance) / temperature
    if weight_fn is not None:
        positive_loss = positive_loss * weight_fn(z1, z2)
    neg_similarity = torch.cat((torch.mm(z1, z1.t()), cross_view_distance), dim=1) / temperature
    neg_mask = torch.eye(z1.size(0), dtype=z1.dtype).repeat(1, 2)
    negative_loss = torch.logsumexp(neg_similarity + neg_mask * SMALL_NUM, dim=1, keepdim=False)
    return (positive_loss + negative_loss).mean()


def vmf_weight_fn(sigma):
    """DCLW's weight, of detached inputs: the weight is a constant of the step (pipeline.losses.dcl)."""
    return lambda z1, z2: 2 - z1.size(0) * F.softmax((z1 * z2).detach().sum(dim=1) / sigma, dim=0)


def simsiam_d(p, z):
    """SimSiam's Algorithm 1: D(p, z)."""
    z = z.detach()
    p = F.normalize(p, dim=1)
    z = F.normalize(z, dim=1)
    return -(p * z).sum(dim=1).mean()


def nnclr_nn(z, q):
    """NNCLR's Algorithm 1: NN(z, Q), the top-1 neighbour of each z in the support set."""
    z = F.normalize(z, dim=1)
    q = F.normalize(q, dim=1)
    return q[torch.argmax(z @ q.T, dim=1)]


def nnclr_l(nn, p, temperature):
    """NNCLR's Algorithm 1: L(nn, p)."""
    nn = F.normalize(nn, dim=1)
    p = F.normalize(p, dim=1)
    logits = nn @ p.T / temperature
    return F.cross_entropy(logits, torch.arange(len(nn)))


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("temperature", [0.07, 0.1, 0.5])
@pytest.mark.parametrize("sigma", [None, 0.5, 0.2])
def test_dcl_is_the_papers_pseudo_code(n: int, d: int, temperature: float, sigma: float | None) -> None:
    z1, z2 = _leaves((n, d), (n, d), seed=n + d)
    u1, u2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    weight_fn = vmf_weight_fn(sigma) if sigma is not None else None
    want = (dcl_one_way(u1, u2, temperature, weight_fn) + dcl_one_way(u2, u1, temperature, weight_fn)) / 2
    got = dcl(z1, z2, temperature, sigma=sigma)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(_grads(got, [z1, z2]), _grads(want, [z1, z2]), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(dcl(z2, z1, temperature, sigma=sigma), got)  # symmetric in the views
    if sigma is not None:
        torch.testing.assert_close(vmf_weights(u1, u2, sigma).mean(), torch.tensor(1.0, dtype=torch.float64))


@pytest.mark.parametrize("n, d", SHAPES)
def test_simsiam_is_the_papers_pseudo_code(n: int, d: int) -> None:
    p, z = _leaves((n, d), (n, d), seed=n)
    got, want = simsiam(p, z), simsiam_d(p, z)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gp, gz = _grads(got, [p, z])
    torch.testing.assert_close(gp, _grads(want, [p])[0], rtol=1e-10, atol=1e-12)
    assert not gz.any(), "the stop-gradient: nothing reaches z"


@pytest.mark.parametrize("n, d", SHAPES)
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nnclr_is_the_papers_pseudo_code(n: int, d: int, temperature: float) -> None:
    z, p, support = _leaves((n, d), (n, d), (3 * n + 4, d), seed=n * d)
    neighbours = nearest_neighbours(z, support)
    torch.testing.assert_close(F.normalize(neighbours, dim=1), nnclr_nn(z, support).detach())
    got, want = nnclr(neighbours, p, temperature), nnclr_l(nnclr_nn(z, support), p, temperature)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    gp, gz, gq = _grads(got, [p, z, support])
    torch.testing.assert_close(gp, _grads(want, [p])[0], rtol=1e-10, atol=1e-12)
    assert not gz.any() and not gq.any(), "neighbours are targets: no gradient to z or the support set"


# ------------------------------------------------------------------------------ each method's assembly


def test_each_method_assembles_the_papers_two_view_loss() -> None:
    views = _views()
    x = torch.cat(views)  # encode() passes both global crops through the network at once
    torch.manual_seed(0)
    simsiam_method = METHODS["simsiam"](TINY, SimSiamConfig())
    loss, _ = simsiam_method(views)
    z = simsiam_method.project(x)
    p = simsiam_method.predictor(z).chunk(2)
    z = z.chunk(2)
    torch.testing.assert_close(loss, simsiam_d(p[0], z[1]) / 2 + simsiam_d(p[1], z[0]) / 2)

    torch.manual_seed(0)
    nnclr_method = METHODS["nnclr"](TINY, NNCLRConfig(queue_size=12))
    support = nnclr_method.queue.clone()
    loss, _ = nnclr_method(views)
    z = nnclr_method.project(x)
    p = nnclr_method.predictor(z).chunk(2)
    z = z.chunk(2)
    t = nnclr_method.cfg.temperature
    want = nnclr_l(nnclr_nn(z[0], support), p[1], t) / 2 + nnclr_l(nnclr_nn(z[1], support), p[0], t) / 2
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(nnclr_method.queue[:8], F.normalize(z[0], dim=1).detach())  # the first view
    torch.testing.assert_close(nnclr_method.queue[8:], support[8:], rtol=0, atol=0)
    assert int(nnclr_method.queue_ptr) == 8

    for weighting, weight_fn in (("none", None), ("vmf", vmf_weight_fn(0.5))):
        torch.manual_seed(0)
        dcl_method = METHODS["dcl"](TINY, DCLConfig(weighting=weighting, sigma=0.5))
        loss, _ = dcl_method(views)
        u = F.normalize(dcl_method.project(x), dim=1).chunk(2)
        want = (dcl_one_way(u[0], u[1], 0.1, weight_fn) + dcl_one_way(u[1], u[0], 0.1, weight_fn)) / 2
        torch.testing.assert_close(loss, want)


# ------------------------------------------------------- NNCLR's support set under two gloo processes

WORLD, LOCAL_B, STEPS = 2, 4, 3
NNCLR_SMALL = NNCLRConfig(queue_size=2 * WORLD * LOCAL_B - 4)  # 3 global batches of 8 wrap a ring of 12


def _nnclr_steps(method, r: int | None) -> list[torch.Tensor]:
    """The loss of each of STEPS steps of the global batch (rank r's part of it, or all of it)."""
    losses = []
    for step in range(STEPS):
        views = _views(WORLD * LOCAL_B, size=16, seed=step)
        if r is not None:
            views = [v[r * LOCAL_B : (r + 1) * LOCAL_B] for v in views]
        losses.append(method(views)[0].detach())
    return losses


def _check_nnclr_support_set(r: int, world: int, want_losses: list[float], want_queue: list) -> None:
    torch.manual_seed(0)
    method = METHODS["nnclr"](VIT, NNCLR_SMALL)
    losses = _nnclr_steps(method, r)
    for step, (loss, want) in enumerate(zip(losses, want_losses, strict=True)):
        torch.testing.assert_close(
            all_reduce_mean(loss).item(), want, rtol=1e-5, atol=1e-6, msg=f"step {step}"
        )
    torch.testing.assert_close(method.queue, torch.tensor(want_queue), rtol=0, atol=1e-6)  # on every rank
    assert int(method.queue_ptr) == STEPS * WORLD * LOCAL_B % NNCLR_SMALL.queue_size


def test_nnclr_support_set_under_two_ranks_is_one_process_over_the_global_batch() -> None:
    """Three steps (the ring wraps, every step looks up neighbours in what the last ones wrote): each
    step's global loss and the support set on every rank equal one process's, computed here (no group)."""
    torch.manual_seed(0)
    reference = METHODS["nnclr"](VIT, NNCLRConfig(queue_size=NNCLR_SMALL.queue_size, gather=False))
    losses = [loss.item() for loss in _nnclr_steps(reference, None)]
    run_ranks(_check_nnclr_support_set, WORLD, losses, reference.queue.tolist())


# ------------------------------------------------------------------------------- SwAV's delayed queue


def _swav_steps(method, optimizer, steps) -> list[tuple[float, int, bool]]:
    """Train `steps` (optimizer step numbers); each step's (loss, queue_ptr, queue_full) after it."""
    out = []
    for step in steps:
        optimizer.zero_grad()
        loss, _ = method(_views(seed=step))
        loss.backward()
        method.after_backward(step, 10)
        optimizer.step()
        method.after_optimizer_step(step, 10)
        out.append((loss.item(), int(method.queue_ptr), bool(method.queue_full)))
    return out


def _swav(cfg: SwAVConfig):
    torch.manual_seed(0)
    method = METHODS["swav"](TINY, cfg)
    return method, torch.optim.SGD(method.parameters(), lr=0.1, momentum=0.9)


def test_swav_queue_starts_at_its_step_and_a_resumed_run_starts_it_at_the_same_step() -> None:
    cfg = SwAVConfig(num_prototypes=16, queue_size=16, queue_start_step=2, freeze_prototypes_steps=0)
    method, optimizer = _swav(cfg)
    whole = _swav_steps(method, optimizer, range(6))
    # Steps 0-1 leave it empty; 2 and 3 fill its two batches of 8; from step 4 it joins Sinkhorn.
    states = [(ptr, full) for _, ptr, full in whole]
    assert states == [(0, False), (0, False), (8, False), (0, True), (8, True), (0, True)]

    # Interrupted after step 1, resumed at step 2, the start step itself: nothing was enqueued yet,
    # so only the saved clock tells the resumed run that the queue starts now.
    first, optimizer = _swav(cfg)
    _swav_steps(first, optimizer, range(2))
    saved = {"model": first.state_dict(), "optimizer": optimizer.state_dict()}
    resumed, optimizer = _swav(cfg)
    resumed.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    assert _swav_steps(resumed, optimizer, range(2, 6)) == whole[2:]
    for key, value in method.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.slow
def test_swav_resumed_at_its_queue_start_step_trains_as_an_uninterrupted_run(sample_shards, tmp_path) -> None:
    """Through the trainer and its checkpoints: stopped after step 2 (the queue's start), resumed to 5."""
    from pipeline.engine.checkpoint import load_for_eval
    from pipeline.train import main

    base = [
        "--config", str(ROOT / "configs" / "debug.yaml"), f"data.train_shards={sample_shards}",
        "method={name: swav, num_prototypes: 16, queue_size: 32, queue_start_step: 2}",
        "method.freeze_prototypes_steps=0",
        "run.deterministic=true", "train.max_steps=5", "logging.progress_bar=false",
    ]  # fmt: skip
    assert main([*base, f"run.output_dir={tmp_path / 'whole'}"]) == 0
    assert main([*base, f"run.output_dir={tmp_path / 'cut'}", "train.max_steps=2"]) == 0
    assert main([*base, f"run.output_dir={tmp_path / 'cut'}"]) == 0
    _, whole = load_for_eval(str(tmp_path / "whole" / "checkpoints"))
    _, cut = load_for_eval(str(tmp_path / "cut" / "checkpoints"))
    assert (int(whole["queue_ptr"]), bool(whole["queue_full"])) == (16, True)  # steps 2-3 filled it, 4 on
    for key, value in whole.items():
        assert torch.equal(cut[key], value), key


def test_swav_checkpoint_from_before_the_queue_clock_loads() -> None:
    method, _ = _swav(SwAVConfig(num_prototypes=16, queue_size=16))
    old = {k: v for k, v in method.state_dict().items() if k != "steps_done"}
    METHODS["swav"](TINY, SwAVConfig(num_prototypes=16, queue_size=16)).load_state_dict(old)  # strict


# ----------------------------------------------------------------------------------- configs, end to end


@pytest.mark.parametrize("name", ["nnclr", "simsiam", "dcl"])
def test_cifar10_configs_load(name: str) -> None:
    from pipeline.config import load

    cfg = load(ROOT / "configs" / f"cifar10_{name}.yaml", ["data.train_shards=x", "data.val_shards=x"])
    assert cfg.method.name == name
    if name != "dcl":  # a predictor regresses (SimSiam) or is contrasted with (NNCLR) the projections
        assert cfg.model.default_predictor().output_dim == cfg.model.projector.output_dim
