"""Reward registry, plugin lookup, validation of results, and the built-in 2D rewards."""

from __future__ import annotations

import importlib.metadata
import math

import pytest
import torch

import rewards
from rewards import Reward, RewardError, build_reward, parse_reward_args, register
from rl_diffusion.errors import UserError

PLUGIN = "tests.reward_plugin_example:factory"


@pytest.fixture
def scratch_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rewards registered in a test vanish after it."""
    monkeypatch.setattr(rewards.base, "_REGISTRY", dict(rewards.base._REGISTRY))


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    eps = [importlib.metadata.EntryPoint(name=n, value=v, group=rewards.ENTRY_POINT_GROUP) for n, v in values.items()]

    def entry_points(group: str) -> list[importlib.metadata.EntryPoint]:
        return eps if group == rewards.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(importlib.metadata, "entry_points", entry_points)


# Built-in rewards.


def test_target_point_is_negative_distance() -> None:
    r = build_reward("target_point")
    x = torch.tensor([[3.0, 4.0], [0.0, 0.0], [-1.0, 0.0]])
    assert torch.allclose(r(x), torch.tensor([-5.0, 0.0, -1.0]))
    r = build_reward("target_point", {"point": [1.0, 1.0]})
    assert torch.allclose(r(torch.tensor([[4.0, 5.0]])), torch.tensor([-5.0]))


@pytest.mark.parametrize(
    "kwargs", [{"shape": "box", "box": [-1, -2, 3, 2]}, {"shape": "disc", "center": [1, 0], "radius": 2.0}]
)
def test_in_region_inside_outside_boundary(kwargs: dict) -> None:
    r = build_reward("in_region", kwargs)
    deep, far, edge = r(torch.tensor([[1.0, 0.0], [30.0, -40.0], [3.0, 0.0]])).tolist()
    assert deep == pytest.approx(1.0, abs=1e-6)
    assert far == pytest.approx(0.0, abs=1e-6)
    assert edge == 0.5


def test_in_region_box_uses_distance_to_nearest_edge() -> None:
    r = build_reward("in_region", {"box": [0, 0, 4, 2], "sharpness": 1.0})
    # Inside: 0.5 from the bottom edge; outside the corner (4, 2): distance 5 via (3, 4).
    x = torch.tensor([[1.0, 0.5], [7.0, 6.0], [2.0, 3.0]])
    expected = torch.sigmoid(torch.tensor([0.5, -5.0, -1.0]))
    assert torch.allclose(r(x), expected)


def test_in_region_disc_value() -> None:
    r = build_reward("in_region", {"shape": "disc", "radius": 1.0, "sharpness": 2.0})
    assert r(torch.tensor([[0.0, 0.5]])).item() == pytest.approx(1 / (1 + math.exp(-1.0)))


@pytest.mark.parametrize("kwargs", [{}, {"shape": "disc", "center": [0.5, 0.5], "sharpness": 3.0}])
def test_avoid_region_is_one_minus_in_region(kwargs: dict) -> None:
    x = torch.randn(64, 2, generator=torch.Generator().manual_seed(0)) * 2
    inside = build_reward("in_region", kwargs)(x)
    assert torch.allclose(build_reward("avoid_region", kwargs)(x), 1 - inside, atol=1e-6)


def test_gmm_log_density_matches_torch_distributions() -> None:
    means, stds, weights = [[0.0, 0.0], [2.0, -1.0]], [1.0, 0.5], [3.0, 1.0]
    r = build_reward("gmm_log_density", {"means": means, "stds": stds, "weights": weights})
    x = torch.tensor([[0.0, 0.0], [2.0, -1.0], [1.0, 1.0]])
    d = torch.distributions
    mixture = d.MixtureSameFamily(
        d.Categorical(probs=torch.tensor([0.75, 0.25])),
        d.Independent(d.Normal(torch.tensor(means), torch.tensor(stds)[:, None].expand(2, 2)), 1),
    )
    assert torch.allclose(r(x), mixture.log_prob(x), atol=1e-5)


def test_gmm_log_density_hand_computed_single_component() -> None:
    r = build_reward("gmm_log_density")
    # Standard 2D normal at (1, 1): -log(2 pi) - 1.
    assert r(torch.tensor([[1.0, 1.0]])).item() == pytest.approx(-math.log(2 * math.pi) - 1, abs=1e-6)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"means": [0, 0]}, "[K, 2]"),
        ({"means": [[0, 0], [1, 1]], "stds": [1.0]}, "stds must have shape (2,)"),
        ({"stds": [0.0]}, "stds must all be > 0"),
        ({"weights": [-1.0]}, "non-negative"),
        ({"means": "abc"}, "means must be numbers"),
    ],
)
def test_gmm_log_density_bad_arguments(kwargs: dict, fragment: str) -> None:
    with pytest.raises(UserError, match="reward 'gmm_log_density'") as e:
        build_reward("gmm_log_density", kwargs)
    assert fragment in str(e.value)


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("in_region", {"shape": "circle"}, "unknown shape 'circle'"),
        ("in_region", {"box": [1, 0, 0, 1]}, "xmin < xmax"),
        ("avoid_region", {"shape": "disc", "radius": -1}, "radius must be > 0"),
        ("in_region", {"sharpness": 0}, "sharpness must be > 0"),
        ("target_point", {"point": [1, 2, 3]}, "point must have shape (2,)"),
    ],
)
def test_region_and_point_bad_arguments(name: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=f"reward '{name}'") as e:
        build_reward(name, kwargs)
    assert fragment in str(e.value)


@pytest.mark.parametrize("name", ["target_point", "in_region", "avoid_region", "gmm_log_density"])
def test_builtins_reject_non_2d_data(name: str) -> None:
    with pytest.raises(RewardError, match=f"reward '{name}' raised ValueError: .*shape \\[B, 2\\]"):
        build_reward(name)(torch.zeros(4, 3))


# Lookup.


def test_lookup_by_name_and_names_listed() -> None:
    r = build_reward("target_point", {"point": [0, 0]})
    assert isinstance(r, Reward) and r.name == "target_point" and r.kwargs == {"point": [0, 0]}
    assert {"target_point", "in_region", "avoid_region", "gmm_log_density"} <= set(rewards.reward_names())


def test_lookup_by_module_path() -> None:
    r = build_reward(PLUGIN, {"scale": 2.0})
    assert r.name == PLUGIN
    assert r(torch.tensor([[1.0, 2.0], [3.0, -3.0]])).tolist() == [6.0, 0.0]


def test_lookup_by_entry_point(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch, summed=PLUGIN)
    assert "summed" in rewards.reward_names()
    r = build_reward("summed", {"scale": -1.0})
    assert r(torch.tensor([[1.0, 2.0]])).tolist() == [-3.0]
    assert "summed: Sum of all coordinates" in rewards.describe_rewards()


def test_broken_entry_point_is_one_line_user_error(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_entry_points(monkeypatch, broken="no_such_pkg_xyz.mod:f")
    with pytest.raises(UserError, match="reward plugin 'broken'.*ModuleNotFoundError") as e:
        build_reward("broken")
    assert "\n" not in str(e.value)
    assert "broken\n    (could not be loaded:" in rewards.describe_rewards()


def test_register_and_duplicate(scratch_registry: None) -> None:
    @register("double_x")
    def double_x() -> rewards.RewardFn:
        return lambda x0, c: 2 * x0[:, 0]

    assert build_reward("double_x")(torch.tensor([[1.5, 0.0]])).tolist() == [3.0]
    with pytest.raises(ValueError, match="already registered"):
        register("double_x")(double_x)


# User mistakes.


def test_unknown_name_suggests_and_says_how_to_add() -> None:
    with pytest.raises(UserError, match="unknown reward 'target_pont'") as e:
        build_reward("target_pont")
    msg = str(e.value)
    assert "did you mean 'target_point'" in msg and "rewards.register" in msg and "rl_diffusion.rewards" in msg


def test_unknown_kwarg_names_accepted_ones() -> None:
    with pytest.raises(UserError, match="reward 'in_region' got unknown argument") as e:
        build_reward("in_region", {"radious": 2.0})
    msg = str(e.value)
    assert "did you mean 'radius'" in msg
    assert "accepts: shape, box, center, radius, sharpness" in msg


def test_import_failure_is_one_line() -> None:
    with pytest.raises(UserError) as e:
        build_reward("no_such_pkg_xyz.sub:f")
    assert str(e.value) == (
        "reward plugin 'no_such_pkg_xyz.sub:f' could not be imported: "
        "ModuleNotFoundError: No module named 'no_such_pkg_xyz'"
    )


def test_missing_attribute_in_plugin_module() -> None:
    with pytest.raises(UserError, match="has no attribute 'factroy'.*did you mean 'factory'"):
        build_reward("tests.reward_plugin_example:factroy")


def _reward(fn: rewards.RewardFn, **options: bool) -> Reward:
    return Reward("bad_one", fn, {}, **options)


def test_reward_that_raises() -> None:
    def boom(x0: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        raise KeyError("missing")

    with pytest.raises(RewardError, match="reward 'bad_one' raised KeyError: 'missing'"):
        _reward(boom)(torch.zeros(3, 2))


@pytest.mark.parametrize(
    "fn, got",
    [
        (lambda x0, c: x0, "(3, 2)"),
        (lambda x0, c: x0.sum(), "()"),
        (lambda x0, c: [0.0, 0.0, 0.0], "a list, not a Tensor"),
    ],
)
def test_reward_with_wrong_shape(fn: rewards.RewardFn, got: str) -> None:
    with pytest.raises(RewardError) as e:
        _reward(fn)(torch.zeros(3, 2))
    assert str(e.value) == f"reward 'bad_one' returned shape {got}, expected (B,) = (3,)"


def test_reward_with_non_finite_values_and_skip_option() -> None:
    def fn(x0: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return torch.tensor([1.0, math.nan, math.inf, 2.0])

    with pytest.raises(RewardError, match=r"reward 'bad_one' returned 2 non-finite value\(s\) \(nan/inf\)"):
        _reward(fn)(torch.zeros(4, 2))
    r = _reward(fn, skip_nonfinite=True)(torch.zeros(4, 2))
    assert torch.isfinite(r).tolist() == [True, False, False, True]
    assert r[torch.isfinite(r)].tolist() == [1.0, 2.0]


def test_reward_result_is_float32_and_condition_passed() -> None:
    seen = []

    def fn(x0: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        seen.append(c)
        return torch.arange(x0.shape[0])

    c = torch.tensor([7, 8])
    r = _reward(fn)(torch.zeros(2, 2, dtype=torch.float64), c)
    assert r.dtype == torch.float32 and r.tolist() == [0.0, 1.0] and seen[0] is c


def test_reward_errors_are_user_errors() -> None:
    assert issubclass(RewardError, UserError)


# Listing and command-line arguments.


def test_describe_rewards_lists_summary_and_arguments() -> None:
    text = rewards.describe_rewards()
    assert "target_point [differentiable]: Negative Euclidean distance" in text
    assert "point (default (0.0, 0.0)): the target (x, y), in data units." in text
    # A continuation line of an argument's doc is joined onto it.
    assert "sharpness (default 10.0): steepness in 1 / data units (> 0); large values" in text
    assert "which gives no signal far from the boundary." in text


def test_parse_reward_args() -> None:
    args = parse_reward_args(["point=[1, 2.5]", "sharpness=3", "shape=disc", "name=a=b", "flag=true", 's="quoted"'])
    assert args == {"point": [1, 2.5], "sharpness": 3, "shape": "disc", "name": "a=b", "flag": True, "s": "quoted"}
    assert parse_reward_args([]) == {}


@pytest.mark.parametrize("item", ["foo", "=3"])
def test_parse_reward_args_malformed(item: str) -> None:
    with pytest.raises(UserError, match=f"--reward-arg expects key=value, got '{item}'"):
        parse_reward_args([item])


# Rewards with known-answer targets, and declared upper bounds.


def test_linear_and_gaussian_bump_hand_computed() -> None:
    x = torch.tensor([[1.0, 2.0], [-3.0, 0.5]])
    assert build_reward("linear")(x).tolist() == [2.0, 0.5]
    assert build_reward("linear", {"a": [2.0, -1.0]})(x).tolist() == [0.0, -6.5]
    bump = build_reward("gaussian_bump", {"center": [1.0, 1.0], "width": 0.5, "scale": 3.0})
    # At the center: scale; one width away: scale * exp(-1/2); two widths: scale * exp(-2).
    x = torch.tensor([[1.0, 1.0], [1.5, 1.0], [1.0, 0.0]])
    assert torch.allclose(bump(x), torch.tensor([3.0, 3.0 * math.exp(-0.5), 3.0 * math.exp(-2.0)]))


def test_gmm_posterior_tilts_the_gmm25_prior_into_the_posterior() -> None:
    d = torch.distributions
    std = math.sqrt(0.3) / 5

    def mixture(means: list[tuple[int, int]], weights: list[float]) -> d.Distribution:
        return d.MixtureSameFamily(
            d.Categorical(probs=torch.tensor(weights, dtype=torch.float64)),
            d.Independent(
                d.Normal(
                    torch.tensor(means, dtype=torch.float64) / 5, torch.full((len(means), 2), std, dtype=torch.float64)
                ),
                1,
            ),
        )

    grid = [(i, j) for i in (-10, -5, 0, 5, 10) for j in (-10, -5, 0, 5, 10)]
    prior = mixture(grid, [1 / 25] * 25)
    posterior = mixture(
        [(-10, -5), (-5, -10), (-5, 0), (10, -5), (0, 0), (0, 5), (5, -5), (5, 0), (5, 10)],
        [w / 61 for w in (4, 10, 4, 5, 10, 5, 4, 15, 4)],
    )
    # Near the grid, where both log-densities are moderate: log p_prior + r = log p_post.
    x = (torch.rand(2000, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64) - 0.5) * 5
    x = x[posterior.log_prob(x) > -50]
    r = build_reward("gmm_posterior")(x).double()
    assert len(x) > 500
    torch.testing.assert_close(prior.log_prob(x) + r, posterior.log_prob(x), atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "name, kwargs, bound, peak",
    [
        ("target_point", {"point": [1.0, -0.5]}, 0.0, [1.0, -0.5]),
        ("in_region", {"shape": "disc", "radius": 2.0}, 1.0, [0.0, 0.0]),
        ("avoid_region", {"sharpness": 3.0}, 1.0, [5.0, 5.0]),
        ("gaussian_bump", {"center": [0.5, 0.5], "scale": 4.0}, 4.0, [0.5, 0.5]),
        ("gaussian_bump", {"scale": -2.0}, 0.0, [100.0, 0.0]),
        ("gmm_log_density", {}, -math.log(2 * math.pi), [0.0, 0.0]),
        # log sum_k w_k / (2 pi s_k^2) = log((0.75 + 0.25 / 0.25) / (2 pi)); the peaks are apart, so it is not reached.
        (
            "gmm_log_density",
            {"means": [[0, 0], [2, -1]], "stds": [1.0, 0.5], "weights": [3, 1]},
            math.log(1.75 / (2 * math.pi)),
            None,
        ),
        ("gmm_posterior", {}, math.log(25 * 15 / 61), [1.0, 0.0]),  # the weight-15 posterior mode
    ],
)
def test_declared_max_value_bounds_the_reward(name: str, kwargs: dict, bound: float, peak: list[float] | None) -> None:
    r = build_reward(name, kwargs)
    assert r.max_value == pytest.approx(bound, abs=1e-12)
    u = torch.linspace(-6, 6, 241)
    far = torch.tensor([[1e3, 0.0], [-1e3, 1e3], [0.0, -1e4], [37.0, -21.0]])
    x = torch.cat([torch.stack(torch.meshgrid(u, u, indexing="ij"), dim=-1).reshape(-1, 2), far])
    assert r(x).max().item() <= bound + 1e-6
    if peak is not None:
        assert r(torch.tensor([peak])).item() == pytest.approx(bound, abs=1e-4)


def test_max_value_is_none_when_undeclared() -> None:
    assert build_reward("linear").max_value is None
    assert _reward(lambda x0, c: x0[:, 0]).max_value is None


@pytest.mark.parametrize(
    "name, kwargs, fragment",
    [
        ("linear", {"a": [1.0]}, "a must have shape (2,)"),
        ("gaussian_bump", {"width": 0.0}, "width must be > 0"),
        ("gaussian_bump", {"scale": math.inf}, "scale must be finite"),
        ("gaussian_bump", {"center": [0, 0, 0]}, "center must have shape (2,)"),
    ],
)
def test_linear_and_bump_bad_arguments(name: str, kwargs: dict, fragment: str) -> None:
    with pytest.raises(UserError, match=f"reward '{name}'") as e:
        build_reward(name, kwargs)
    assert fragment in str(e.value)


@pytest.mark.parametrize("name", ["linear", "gaussian_bump", "gmm_posterior"])
def test_new_builtins_reject_non_2d_data(name: str) -> None:
    with pytest.raises(RewardError, match=f"reward '{name}' raised ValueError: .*shape \\[B, 2\\]"):
        build_reward(name)(torch.zeros(4, 3))


# Gradients d r / d x0, for fine-tuning through the reward.

DIFFERENTIABLE_2D = [
    ("target_point", {"point": [1.0, -0.5]}),
    ("in_region", {"box": [-1, -2, 0.5, 1], "sharpness": 2.0}),
    ("in_region", {"shape": "disc", "center": [0.5, 0], "radius": 1.5, "sharpness": 3.0}),
    ("avoid_region", {"sharpness": 1.5}),
    ("gmm_log_density", {"means": [[0, 0], [2, -1]], "stds": [1.0, 0.5], "weights": [3, 1]}),
    ("linear", {"a": [2.0, -1.0]}),
    ("gaussian_bump", {"center": [0.5, 0.5], "width": 1.0, "scale": 3.0}),
    ("gmm_posterior", {}),
]


def central_differences(fn: rewards.RewardFn, x: torch.Tensor, h: float) -> torch.Tensor:
    """d fn(x)_b / d x_b by central differences, one coordinate of every sample at a time."""
    grad = torch.zeros_like(x)
    for i in range(x[0].numel()):
        step = torch.zeros_like(x).flatten(1)
        step[:, i] = h
        step = step.view_as(x)
        grad.flatten(1)[:, i] = (fn(x + step, None) - fn(x - step, None)) / (2 * h)
    return grad


@pytest.mark.parametrize("name, kwargs", DIFFERENTIABLE_2D)
def test_gradient_matches_central_differences(name: str, kwargs: dict) -> None:
    r = build_reward(name, kwargs)
    assert r.differentiable
    x = torch.randn(6, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5
    values, grad = r.gradient(x)
    assert values.dtype == torch.float32 and not values.requires_grad and torch.equal(values, r(x))
    assert grad.shape == x.shape and grad.dtype == torch.float64
    assert grad.abs().max() > 1e-3  # a useful signal, not an all-zero gradient
    # Differences of the float64 function itself: Reward rounds scores to float32.
    torch.testing.assert_close(grad, central_differences(r.fn, x, 1e-6), atol=1e-6, rtol=1e-5)


def test_gradient_under_no_grad_leaves_x0_alone() -> None:
    r = build_reward("gaussian_bump", {"center": [0.0, 0.0], "width": 1.0, "scale": 2.0})
    x = torch.tensor([[1.0, 0.0], [0.0, -2.0]])
    with torch.no_grad():
        values, grad = r.gradient(x)
    # d/dx scale exp(-|x|^2 / 2) = -x r(x).
    torch.testing.assert_close(grad, -x * values[:, None])
    assert not x.requires_grad and x.grad is None


@pytest.mark.parametrize("name", ["jpeg_compressibility", "jpeg_incompressibility"])
def test_gradient_of_non_differentiable_reward_is_one_line_error(name: str) -> None:
    r = build_reward(name)
    assert not r.differentiable
    with pytest.raises(RewardError, match=f"reward '{name}' is not differentiable; .*rl-diffusion rewards") as e:
        r.gradient(torch.zeros(2, 1, 8, 8))
    assert "\n" not in str(e.value)


def test_undeclared_plugin_is_not_differentiable() -> None:
    r = build_reward(PLUGIN)
    assert not r.differentiable
    with pytest.raises(RewardError, match="not differentiable"):
        r.gradient(torch.zeros(2, 2))


def test_declared_reward_without_autograd_graph_is_reported() -> None:
    def fn(x0: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return x0.detach().sum(dim=1)

    fn.differentiable = True  # type: ignore[attr-defined]
    with pytest.raises(RewardError, match="reward 'bad_one' declares differentiable = True but .* through autograd"):
        _reward(fn).gradient(torch.zeros(3, 2))


def test_non_finite_gradient_raises_or_is_masked_with_skip_option() -> None:
    # sqrt(|x|) is finite at 0 but its derivative is not.
    def fn(x0: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return x0[:, 0].abs().sqrt()

    fn.differentiable = True  # type: ignore[attr-defined]
    x = torch.tensor([[4.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    with pytest.raises(RewardError, match=r"reward 'bad_one' has a non-finite gradient \(nan/inf\) for 1 sample") as e:
        _reward(fn).gradient(x)
    assert "\n" not in str(e.value) and "--skip-nonfinite-rewards" in str(e.value)
    values, grad = _reward(fn, skip_nonfinite=True).gradient(x)
    assert torch.isfinite(values).tolist() == [True, False, True]
    assert torch.isfinite(grad).all(dim=1).tolist() == [True, False, True]
    torch.testing.assert_close(grad[[0, 2]], torch.tensor([[0.25, 0.0], [0.5, 0.0]]))


def test_non_finite_reward_still_raises_in_gradient() -> None:
    def fn(x0: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        return x0[:, 0].log()

    fn.differentiable = True  # type: ignore[attr-defined]
    with pytest.raises(RewardError, match="returned 1 non-finite value"):
        _reward(fn).gradient(torch.tensor([[1.0, 0.0], [-1.0, 0.0]]))


def test_listing_marks_differentiable_rewards_as_built() -> None:
    lines = rewards.describe_rewards().splitlines()
    marked = {line.split(" [differentiable]:")[0] for line in lines if " [differentiable]: " in line}
    assert marked == {
        *{name for name, _ in DIFFERENTIABLE_2D},
        "brightness",
        "digit_classifier",
        "classifier",
    }
    assert any(line.startswith("jpeg_compressibility: ") for line in lines)
    assert lines[-1].startswith("[differentiable]: the reward gives its gradient d r / d x0")
    # The marker and the built reward agree (rewards cheap to build with their defaults).
    for name in ["target_point", "in_region", "gmm_posterior", "brightness", "jpeg_compressibility"]:
        assert build_reward(name).differentiable == (name in marked)
