import math

import numpy as np
import pytest

from rl_diffusion.errors import UserError
from rl_diffusion.schedules import SCHEDULES, abar_continuous, betas_for


def test_linear_golden_values_match_ddpm_at_T_1000():
    betas = betas_for("linear", 1000)
    # beta_i = 1 - exp(-int_{(i-1)/T}^{i/T} (0.1 + 19.9 s) ds), by hand for i = 1 and i = T
    assert betas[0] == pytest.approx(1 - math.exp(-(0.1 * 1e-3 + 9.95 * 1e-6)), rel=1e-9)
    assert betas[-1] == pytest.approx(1 - math.exp(-(0.1 * 1e-3 + 9.95 * (1 - 0.999**2))), rel=1e-9)
    # DDPM's schedule, linspace(1e-4, 0.02, 1000), to within 1% of its largest beta
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=0, atol=2.1e-4)
    assert np.prod(1 - betas) == pytest.approx(math.exp(-10.05), rel=1e-9)


def test_cosine_golden_values_of_nichol_and_dhariwal_eq_17():
    # abar(t) = f(t) / f(0), f(t) = cos^2((t + s) / (1 + s) * pi / 2), s = 0.008; evaluated to 30 digits
    # and written here to 12. At t = (1 - s) / 2 the angle is pi / 4, so abar = 0.5 / f(0) = 0.5 / 0.999844591000.
    assert abar_continuous("cosine", 0.496) == pytest.approx(0.500077716578, rel=1e-10)
    assert abar_continuous("cosine", 0.25) == pytest.approx(0.847012161327, rel=1e-10)
    assert abar_continuous("cosine", 0.5) == pytest.approx(0.493843590441, rel=1e-10)
    assert abar_continuous("cosine", 1.0) == pytest.approx(0.0, abs=1e-15)  # the angle reaches pi / 2 exactly
    # improved-diffusion's cosine schedule at T = 1000 starts at beta_1 = 1 - abar(1/1000) = 4.128e-5
    assert betas_for("cosine", 1000)[0] == pytest.approx(4.12842248218e-5, rel=1e-8)


def test_sigmoid_and_quadratic_golden_values():
    # sigmoid schedule is symmetric around t = 0.5 with start = -3, end = 3: abar(0.5) = 1/2
    assert abar_continuous("sigmoid", 0.5) == pytest.approx(0.5)
    assert abar_continuous("quadratic", 1.0) == pytest.approx(math.exp(-(0.1 + math.sqrt(2.0) + 20.0) / 3))


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("T", [10, 50, 100, 1000])
def test_every_schedule_ends_near_pure_noise_for_any_T(name, T):
    betas = betas_for(name, T)
    assert betas.dtype == np.float64 and betas.shape == (T,)
    assert np.all(betas > 0) and np.all(betas <= 0.999)
    assert np.prod(1 - betas) < 1e-3
    assert np.all(np.diff(np.cumprod(1 - betas)) < 0)


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_discrete_schedule_reads_the_continuous_one(name):
    T = 50
    abar = np.cumprod(1 - betas_for(name, T))
    expected = abar_continuous(name, np.arange(1, T + 1) / T)
    # identical until the 0.999 clip at the very end of schedules with abar(1) = 0
    np.testing.assert_allclose(abar[:-1], expected[:-1], rtol=1e-10)
    assert abar_continuous(name, 0.0) == pytest.approx(1.0)


def test_unknown_schedule_is_a_user_error():
    with pytest.raises(UserError, match="did you mean 'cosine'"):
        betas_for("cosin", 100)
