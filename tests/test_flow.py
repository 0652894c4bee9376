import pytest
import torch

from framecast import flow


def test_shift_fixes_endpoints_and_is_monotone():
    s = torch.linspace(0, 1, 101, dtype=torch.float64)
    y = flow.shift(s, 5.0)
    assert y[0] == 0 and y[-1] == 1
    assert bool((y[1:] > y[:-1]).all())


def test_noise_and_parameterisation_round_trip():
    x0, eps = torch.randn(2, 3, 4, 5, 5), torch.randn(2, 3, 4, 5, 5)
    sigma = torch.rand(2, 3) * 0.9 + 0.05
    xt = flow.add_noise(x0, eps, sigma)
    assert torch.equal(flow.add_noise(x0, eps, torch.zeros(2, 3)), x0)
    assert torch.equal(flow.add_noise(x0, eps, torch.ones(2, 3)), eps)
    v = flow.velocity_target(x0, eps)
    torch.testing.assert_close(flow.v_to_x0(xt, v, sigma), x0, atol=1e-5, rtol=0)
    torch.testing.assert_close(flow.x0_to_v(xt, x0, sigma), v, atol=1e-4, rtol=0)
    # an exact Euler step along the straight path lands on the path
    s2 = sigma * 0.5
    torch.testing.assert_close(flow.euler_step(xt, v, sigma, s2), flow.add_noise(x0, eps, s2), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="sigma = 0"):
        flow.x0_to_v(xt, x0, torch.zeros(2, 3))


def test_warped_step_lists_are_exact():
    # method.md §2 table: [1000,750,500,250] -> sigma [1, .9375, .8333, .625]; [1000,500] -> [1, .8333]
    torch.testing.assert_close(flow.few_step_sigmas([1000, 750, 500, 250], 5.0),
                               torch.tensor([1, 0.9375, 5 / 6, 0.625], dtype=torch.float64))
    torch.testing.assert_close(flow.few_step_sigmas([1000, 500], 5.0), torch.tensor([1, 5 / 6], dtype=torch.float64))
    with pytest.raises(ValueError, match="decreasing"):
        flow.few_step_sigmas([500, 1000], 5.0)


def test_grid_aligns_with_four_step_list():
    g = flow.grid(48, 5.0)
    assert g.shape == (49,) and g[0] == 1 and g[-1] == 0
    four = flow.few_step_sigmas([1000, 750, 500, 250], 5.0)
    assert flow.grid_indices(four, 48, 5.0) == [0, 12, 24, 36]
    assert abs(float(g[47]) * 1000 - 96.15) < 0.01  # the smallest CD/ODE grid point (method.md §6)
    with pytest.raises(ValueError, match="not on the 50-step"):
        flow.grid_indices(four, 50, 5.0)


def test_bell_weight_matches_spec_table():
    s = flow.shift
    expected = {1000: 0.0, 937.5: 0.40, 833.33: 1.03, 625: 1.91, 500: 2.08, 250: 1.46, 100: 0.64, 20: 0.13}
    for t, w in expected.items():
        got = float(flow.bell_weight(torch.tensor([t / 1000], dtype=torch.float64), 5.0))
        assert abs(got - w) < 0.01, (t, got, w)
    grid_w = flow.bell_weight(flow.train_grid(5.0), 5.0)
    assert abs(float(grid_w.mean()) - 1) < 1e-9
    assert s(0.5, 1.0) == 0.5


def test_block_sigmas_share_within_block():
    g = torch.Generator().manual_seed(0)
    sig = flow.sample_block_sigmas(64, 7, 3, 5.0, generator=g)
    assert sig.shape == (64, 7)
    assert torch.equal(sig[:, 0], sig[:, 2]) and torch.equal(sig[:, 3], sig[:, 5])
    assert not torch.equal(sig[:, 0], sig[:, 3])  # independent blocks
    grid = flow.train_grid(5.0).float()
    assert bool(torch.isin(sig, grid).all())
    shared = flow.sample_block_sigmas(8, 5, 1, 5.0, generator=g, shared=True)
    assert bool((shared == shared[:, :1]).all())
    # shift 5 puts most draws at high noise (method.md §2)
    many = flow.sample_block_sigmas(4000, 1, 1, 5.0, generator=g)
    assert float((many > 0.5).float().mean()) > 0.75
