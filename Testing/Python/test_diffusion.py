"""Noise schedule, eq. 7 loss, EMA and the two samplers (checked against an exact eps-predictor)."""
from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from XctDiffCore.diffusion import (
    SAMPLERS,
    Cancelled,
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    NoiseSchedule,
    sample,
)
from XctDiffCore.errors import XctDiffError
from XctDiffCore.training.common import EMA  # training-only: the averaged weights
from XctDiffCore.training.diffusion import diffusion_loss  # training-only: the loss

SCHEDULE = NoiseSchedule()
MU, STD = 0.5, 0.5  # the toy data distribution: every element of x0 ~ N(MU, STD^2), independently


def gaussian_eps(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The exact E[eps | x_t] for Gaussian data: x_t ~ N(sqrt(a) MU, a STD^2 + 1 - a)."""
    a = SCHEDULE.alphas_cumprod[t].to(x.dtype).reshape(-1, 1, 1, 1, 1)
    return (1 - a).sqrt() * (x - a.sqrt() * MU) / (a * STD**2 + 1 - a)


def exact_flow(x_start: torch.Tensor) -> torch.Tensor:
    """Where the probability-flow ODE takes x at t = T-1 for Gaussian data: an affine map."""
    a = SCHEDULE.alphas_cumprod[-1].float()
    return MU + STD * (x_start - a.sqrt() * MU) / (a * STD**2 + 1 - a).sqrt()


def test_schedule_is_linear_in_sqrt_beta_like_latent_diffusion():
    betas = SCHEDULE.betas
    assert len(betas) == 1000
    assert betas[0].item() == pytest.approx(0.0015) and betas[-1].item() == pytest.approx(0.0125)
    # latent-diffusion make_beta_schedule("linear"): linspace(start ** 0.5, end ** 0.5, n) ** 2
    torch.testing.assert_close(betas, torch.linspace(0.0015**0.5, 0.0125**0.5, 1000, dtype=torch.float64) ** 2)
    assert betas[500].item() < (0.0015 + 0.0125) / 2 - 1e-4  # not linear in beta
    torch.testing.assert_close(SCHEDULE.alphas_cumprod, torch.cumprod(1 - betas, 0))


def test_add_noise_mixes_with_the_schedule():
    x0, noise = torch.full((2, 1, 2, 2, 2), 2.0), torch.ones(2, 1, 2, 2, 2)
    t = torch.tensor([0, 999])
    out = SCHEDULE.add_noise(x0, noise, t)
    a = SCHEDULE.alphas_cumprod[t].float()
    expected = (2 * a.sqrt() + (1 - a).sqrt()).reshape(2, 1, 1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected)


def test_diffusion_loss_is_the_eps_mse_and_reproducible():
    x0 = torch.randn(4, 2, 3, 4, 4)
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    loss = diffusion_loss(zero, x0, x0, SCHEDULE, generator=torch.Generator().manual_seed(0))
    # The loss of the zero predictor is mean(eps^2) of the very noise drawn with that seed.
    g = torch.Generator().manual_seed(0)
    torch.randint(0, 1000, (4,), generator=g)
    assert loss.item() == pytest.approx(torch.randn(x0.shape, generator=g).pow(2).mean().item())
    again = diffusion_loss(zero, x0, x0, SCHEDULE, generator=torch.Generator().manual_seed(0))
    assert again.item() == loss.item()
    # The exact predictor of Gaussian data does far better than the zero one.
    gaussian = MU + STD * torch.randn(8, 1, 8, 8, 8)
    assert diffusion_loss(gaussian_eps, gaussian, gaussian, SCHEDULE).item() < 0.5 * diffusion_loss(zero, gaussian, gaussian, SCHEDULE).item()


def test_ema_averages_with_warmup_and_round_trips():
    model = nn.Linear(3, 2)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # n = 0: decay min(0.9, 1/10) = 0.1
    torch.testing.assert_close(ema.module.weight, 0.1 * start + 0.9 * (start + 1))
    for _ in range(50):
        ema.update(model)
    assert ema.num_updates.item() == 51
    assert not any(p.requires_grad for p in ema.module.parameters())
    state = ema.state_dict()
    assert set(state) == {"module.weight", "module.bias", "num_updates"}
    fresh = EMA(nn.Linear(3, 2), decay=0.9)
    fresh.load_state_dict(state)
    torch.testing.assert_close(fresh.module.weight, ema.module.weight)
    torch.testing.assert_close(fresh(torch.ones(1, 3)), ema.module(torch.ones(1, 3)))


@pytest.mark.parametrize("steps", [1, 2, 10, 50, 999, 1000])
def test_timesteps_descend_from_the_last_to_the_first(steps):
    for scheduler in (DDIMScheduler(SCHEDULE), DPMSolverMultistepScheduler(SCHEDULE)):
        scheduler.set_timesteps(steps)
        ts = scheduler.timesteps
        assert len(ts) == steps and ts[0].item() == 999
        assert steps == 1 or ts[-1].item() == 0
        assert bool((ts[:-1] > ts[1:]).all())


@pytest.mark.parametrize("steps", [0, 1001])
def test_bad_step_counts_and_samplers_are_readable_errors(steps):
    with pytest.raises(XctDiffError):
        sample(gaussian_eps, torch.zeros(1, 1), (1, 1, 2, 2, 2), SCHEDULE, steps=steps)
    with pytest.raises(XctDiffError):
        sample(gaussian_eps, torch.zeros(1, 1), (1, 1, 2, 2, 2), SCHEDULE, sampler="euler")


def _toy_samples(sampler: str, steps: int):
    shape = (2, 1, 16, 16, 16)
    out = sample(gaussian_eps, torch.zeros(1, 1), shape, SCHEDULE, sampler=sampler, steps=steps,
                 generator=torch.Generator().manual_seed(3))
    start = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    return out, exact_flow(start)


@pytest.mark.parametrize("sampler, steps, max_error", [("ddim", 50, 0.1), ("dpm-solver++", 20, 0.04), ("dpm-solver++", 50, 0.01)])
def test_samplers_follow_the_exact_flow_of_gaussian_data(sampler, steps, max_error):
    out, exact = _toy_samples(sampler, steps)
    assert (out - exact).abs().max().item() < max_error
    # ...and so recover the data distribution (8192 draws: the standard error of the mean is 0.006).
    assert out.mean().item() == pytest.approx(MU, abs=0.03)
    assert out.std().item() == pytest.approx(STD, rel=0.06)


V_SCHEDULE = NoiseSchedule(prediction="v")


def gaussian_v(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """The exact v of Gaussian data, from the exact eps: v = (eps - sqrt(1 - a) x_t) / sqrt(a)."""
    a = SCHEDULE.alphas_cumprod[t].to(x.dtype).reshape(-1, 1, 1, 1, 1)
    return (gaussian_eps(x, t, cond) - (1 - a).sqrt() * x) / a.sqrt()


def test_v_target_and_its_epsilon_invert_each_other():
    x0, noise = torch.randn(3, 2, 4, 4, 4), torch.randn(3, 2, 4, 4, 4)
    t = torch.tensor([0, 500, 999])
    x_t = V_SCHEDULE.add_noise(x0, noise, t)
    v = V_SCHEDULE.target(x0, noise, t)
    torch.testing.assert_close(V_SCHEDULE.to_epsilon(v, x_t, t), noise, rtol=1e-4, atol=1e-4)
    a = V_SCHEDULE.alphas_cumprod[t].float().reshape(-1, 1, 1, 1, 1)
    torch.testing.assert_close(a.sqrt() * x_t - (1 - a).sqrt() * v, x0, rtol=1e-4, atol=1e-4)  # x0 from v
    assert SCHEDULE.target(x0, noise, t) is noise and SCHEDULE.to_epsilon(v, x_t, t) is v
    with pytest.raises(ValueError, match="prediction must be one of"):
        NoiseSchedule(prediction="x0")


def test_v_loss_is_the_v_mse():
    # x0 seeded and three times the noise's scale: with both unit-variance the v and epsilon losses have the
    # same expectation, and an unseeded x0 made them agree to 0.1 % by chance in a CI run
    x0 = 3.0 * torch.randn(4, 2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    loss = diffusion_loss(zero, x0, x0, V_SCHEDULE, generator=torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 1000, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    assert loss.item() == pytest.approx(V_SCHEDULE.target(x0, noise, t).pow(2).mean().item(), rel=1e-6)
    assert loss.item() != pytest.approx(noise.pow(2).mean().item(), rel=1e-3)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_an_exact_v_model_samples_what_the_exact_eps_model_does(sampler):
    shape = (2, 1, 8, 8, 8)
    runs = [sample(model, torch.zeros(1, 1), shape, schedule, sampler=sampler, steps=20,
                   generator=torch.Generator().manual_seed(3))
            for model, schedule in ((gaussian_eps, SCHEDULE), (gaussian_v, V_SCHEDULE))]
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-4, atol=1e-4)
    assert runs[0].std().item() == pytest.approx(STD, rel=0.15)


def test_dpm_solver_is_higher_order_than_ddim():
    ddim, exact = _toy_samples("ddim", 10)
    dpm, _ = _toy_samples("dpm-solver++", 10)
    assert (dpm - exact).abs().max() < 0.5 * (ddim - exact).abs().max()


class CountingModel:
    """The Gaussian eps-predictor that counts its calls and can set an event on its first call."""

    def __init__(self, event: threading.Event = None):
        self.calls, self.event = 0, event

    def __call__(self, x, t, cond):
        self.calls += 1
        if self.event is not None:
            self.event.set()
        return gaussian_eps(x, t, cond)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_same_seed_same_samples_and_batched_uncertainty(sampler):
    cond = torch.zeros(1, 1)
    run = lambda seed: sample(gaussian_eps, cond, (3, 1, 4, 4, 4), SCHEDULE, sampler=sampler, steps=5,  # noqa: E731
                              generator=torch.Generator().manual_seed(seed))
    a, b, c = run(7), run(7), run(8)
    assert a.shape == (3, 1, 4, 4, 4)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    assert not torch.allclose(a[0], a[1])  # K samples of one condition differ


def test_progress_rises_to_one_once_per_step():
    seen = []
    model = CountingModel()
    sample(model, torch.zeros(1, 1), (1, 1, 2, 2, 2), SCHEDULE, sampler="dpm-solver++", steps=7, progress=seen.append)
    assert model.calls == 7 and len(seen) == 7
    assert all(b > a for a, b in zip(seen, seen[1:]))
    assert seen[-1] == 1.0


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_cancel_stops_within_one_step(sampler):
    cancel = threading.Event()
    model = CountingModel(event=cancel)  # asks to cancel during the first step
    with pytest.raises(Cancelled):
        sample(model, torch.zeros(1, 1), (1, 1, 2, 2, 2), SCHEDULE, sampler=sampler, steps=50, cancel=cancel)
    assert model.calls == 1
    idle = CountingModel()
    with pytest.raises(Cancelled):
        sample(idle, torch.zeros(1, 1), (1, 1, 2, 2, 2), SCHEDULE, sampler=sampler, steps=50, cancel=cancel)
    assert idle.calls == 0
