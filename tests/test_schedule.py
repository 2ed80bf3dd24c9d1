import math

import pytest
import torch

from pyrovae.diffusion.schedule import NoiseSchedule, cosine_betas, linear_betas


def test_alpha_bar_is_the_product_of_alphas():
    betas = torch.rand(7, dtype=torch.float64) * 0.5 + 0.01
    s = NoiseSchedule(betas)
    for t in range(1, 8):
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(torch.prod(1 - betas[:t]).item(), rel=1e-12)


def test_linear_schedule_matches_ho_et_al_at_T_1000_and_is_scaled_for_other_T():
    b = linear_betas(1000)
    assert b[0].item() == pytest.approx(1e-4) and b[-1].item() == pytest.approx(0.02)
    b = linear_betas(100)
    assert b[0].item() == pytest.approx(1e-3) and b[-1].item() == pytest.approx(0.2)
    for T in (1, 4, 100, 1000):
        s = NoiseSchedule(linear_betas(T))
        assert s.T == T
        assert s.alphas_cumprod[-1] < 1e-3 or T == 1


def test_cosine_schedule_alpha_bar_follows_the_squared_cosine():
    T, s_off = 50, 0.008
    s = NoiseSchedule(cosine_betas(T))

    def f(t):
        return math.cos((t / T + s_off) / (1 + s_off) * math.pi / 2) ** 2

    for t in (1, 10, 25, 40):
        assert s.alphas_cumprod[t - 1].item() == pytest.approx(f(t) / f(0), rel=1e-10)
    assert s.betas.max().item() <= 0.999


def test_q_xt_given_x0_is_the_composition_of_forward_steps():
    # Monte Carlo: x_3 drawn step by step has the closed-form mean and variance.
    s = NoiseSchedule(torch.tensor([0.1, 0.2, 0.3]))
    torch.manual_seed(0)
    x0 = torch.full((200_000, 1), 1.5, dtype=torch.float64)
    x = x0
    for t in (1, 2, 3):
        x = s.q_step(x, t).sample()
    q = s.q_xt_given_x0(x0[:1], 3)
    n = len(x)
    var = q.base_dist.scale.item() ** 2
    assert abs(x.mean().item() - q.mean.item()) < 5 * math.sqrt(var / n)
    assert abs(x.var().item() - var) < 5 * var * math.sqrt(2 / n)


def test_q_posterior_matches_bayes_rule():
    # q(x_{t-1}|x_t,x_0) ∝ q(x_t|x_{t-1}) q(x_{t-1}|x_0): product of two Gaussians in x_{t-1}.
    torch.manual_seed(1)
    s = NoiseSchedule(torch.rand(6, dtype=torch.float64) * 0.3 + 0.05)
    x0 = torch.randn(5, 3, dtype=torch.float64)
    x_t = torch.randn(5, 3, dtype=torch.float64)
    for t in range(2, 7):
        a, b = s.alphas[t - 1], s.betas[t - 1]
        ab_prev = s.alphas_cumprod[t - 2]
        precision = a / b + 1 / (1 - ab_prev)
        mean = (a.sqrt() * x_t / b + ab_prev.sqrt() * x0 / (1 - ab_prev)) / precision
        q = s.q_posterior(x_t, x0, torch.full((5,), t))
        torch.testing.assert_close(q.mean, mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(q.variance, (1 / precision).expand(5, 3), rtol=1e-10, atol=1e-12)


def test_q_posterior_at_t_1_is_refused_and_its_log_variance_is_clipped():
    s = NoiseSchedule(linear_betas(10))
    with pytest.raises(ValueError, match="t >= 2"):
        s.q_posterior(torch.zeros(1, 2), torch.zeros(1, 2), 1)
    assert s.posterior_variance[0] == 0
    assert s.posterior_log_variance_clipped[0] == s.posterior_variance[1].log()


def test_bad_betas_and_T_are_clear_errors():
    for betas in ([0.1, 1.0], [0.0, 0.5], [0.1, float("nan")], [-0.1], []):
        with pytest.raises(ValueError, match="betas"):
            NoiseSchedule(torch.tensor(betas))
    for T in (0, -3, 2.5):
        with pytest.raises(ValueError, match="T"):
            NoiseSchedule.from_name("linear", T)
    with pytest.raises(ValueError, match="schedule"):
        NoiseSchedule.from_name("quadratic", 10)
    s = NoiseSchedule(linear_betas(10))
    with pytest.raises(ValueError, match="1..10"):
        s.q_sample(torch.zeros(2, 3), torch.tensor([0, 3]))
    with pytest.raises(TypeError, match="integer"):
        s.q_sample(torch.zeros(2, 3), torch.tensor([1.0, 3.0]))


def test_respaced_schedule_keeps_q_xt_given_x0_at_the_kept_times():
    # (linear: the cosine schedule's last respaced beta would hit the 0.999 cap)
    s = NoiseSchedule(linear_betas(100))
    r = s.respace(10)
    assert r.T == 10 and r.timesteps[-1] == 100 and r.timesteps[0] == 1
    torch.testing.assert_close(r.alphas_cumprod, s.alphas_cumprod[r.timesteps - 1])
    with pytest.raises(ValueError, match="steps"):
        s.respace(101)


def test_buffers_follow_the_module_and_cast_to_the_data_dtype():
    s = NoiseSchedule(linear_betas(5))
    names = {n for n, _ in s.named_buffers()}
    assert {"betas", "alphas_cumprod", "posterior_mean_coef1", "posterior_log_variance_clipped"} <= names
    x = torch.zeros(3, 2, dtype=torch.float32)
    assert s.q_sample(x, torch.tensor([1, 2, 5])).dtype == torch.float32
    d = s.q_xt_given_x0(x, torch.tensor([1, 2, 5]))
    assert d.batch_shape == (3,) and d.event_shape == (2,)


def test_tiny_betas_keep_one_minus_alpha_bar_and_a_finite_bound_in_float32():
    # 1 - alpha_bar is formed in float64 before the cast: 1 - float32(1 - 4e-12) would be 0
    from pyrovae.diffusion.chain import DiffusionChain
    from pyrovae.diffusion.denoisers import TimeMLP

    s = NoiseSchedule(torch.full((4,), 1e-12, dtype=torch.float64))
    assert s.one_minus_alphas_cumprod[-1].item() == pytest.approx(4e-12, rel=1e-9)
    x0 = torch.tensor([[0.5, -0.25]])
    mean, var = s.q_mean_variance(x0, 4)
    assert var.dtype == torch.float32 and var[0, 0].item() == pytest.approx(4e-12, rel=1e-6)
    torch.manual_seed(0)
    chain = DiffusionChain(TimeMLP(2, (8,)), s, 2)
    with torch.no_grad():
        bound = chain.full_bound(x0)
    assert torch.isfinite(bound["total"]).all() and torch.isfinite(bound["prior"]).all()
    # L_T = KL(N(sqrt(ab) x0, 1 - ab) || N(0, 1)) = 0.5 sum(ab x0^2 + (1 - ab) - 1 - log(1 - ab)), in float64
    ab, v = 1 - 4e-12, 4e-12
    expected = 0.5 * sum(ab * xi**2 + v - 1 - math.log(v) for xi in (0.5, -0.25))
    assert bound["prior"].item() == pytest.approx(expected, rel=1e-5)


def test_respacing_to_one_step_keeps_the_last_time():
    s = NoiseSchedule(linear_betas(1000))
    r = s.respace(1)
    assert r.timesteps.tolist() == [1000] and r.original_T == 1000
    assert r.alphas_cumprod[0].item() == pytest.approx(s.alphas_cumprod[-1].item(), rel=1e-12)
    with pytest.raises(ValueError, match="together"):
        NoiseSchedule(linear_betas(3), timesteps=[1, 5, 9])
