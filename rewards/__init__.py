"""Rewards: build one by its spec (a registered name, 'package.module:factory', an entry point, the URL
of a served reward, or a weighted sum of those). The registry, the `Reward` wrapper and its checks are in
rewards/base.py; the built-in rewards register themselves there when this package is imported.
"""

from __future__ import annotations

from typing import Any

from rewards import builtin_2d as _builtin_2d  # noqa: F401  (registers the 2D rewards)
from rewards import builtin_images as _builtin_images  # noqa: F401  (registers the image rewards)
from rewards.base import (
    ENTRY_POINT_GROUP,
    URL_SCHEMES,
    Reward,
    RewardError,
    RewardFn,
    ServedRewardError,
    _check_kwargs,
    _find_factory,
    describe_rewards,
    differentiable,
    fingerprint_changes,
    finite_mean,
    is_url,
    parse_reward_args,
    register,
    reward_fingerprint,
    reward_names,
)
from rewards.remote import build_remote
from rewards.weighted import is_weighted_sum, parse_terms, split_args, weighted_sum
from rl_diffusion.errors import UserError


def build_reward(
    spec: str, kwargs: dict[str, Any] | None = None, *, skip_nonfinite: bool = False, on_failure: str = "stop"
) -> Reward:
    """Build the reward ``spec`` (registered name, 'package.module:factory', entry point, the URL of a
    served reward: rewards/remote.py, or a weighted sum of those: rewards/weighted.py).

    A registered name wins over an entry point of the same name. Every user mistake (unknown
    name, failed import, unknown argument, bad argument value) is a UserError. ``on_failure``
    (stop | skip) applies to a served reward only: what a batch that fails every try becomes.
    """
    if is_weighted_sum(spec):
        terms = parse_terms(spec)
        args = split_args(spec, [label for label, _, _ in terms], dict(kwargs or {}))
        components = [
            (label, weight, build_reward(name, args[label], skip_nonfinite=skip_nonfinite, on_failure=on_failure))
            for label, weight, name in terms
        ]
        return weighted_sum(spec, kwargs, components, skip_nonfinite=skip_nonfinite, on_failure=on_failure)
    if is_url(spec):
        return build_remote(spec, kwargs, skip_nonfinite=skip_nonfinite, on_failure=on_failure)
    kwargs = dict(kwargs or {})
    factory = _find_factory(spec)
    _check_kwargs(spec, factory, kwargs)
    try:
        fn = factory(**kwargs)
    except (TypeError, ValueError) as e:
        raise UserError(f"reward '{spec}': {' '.join(str(e).split())}") from e
    if not callable(fn):
        raise UserError(f"reward factory '{spec}' returned a {type(fn).__name__}, not a function")
    return Reward(
        spec, fn, kwargs, skip_nonfinite=skip_nonfinite, fingerprint=reward_fingerprint(spec, factory, kwargs)
    )


__all__ = [
    "ENTRY_POINT_GROUP",
    "URL_SCHEMES",
    "Reward",
    "RewardError",
    "RewardFn",
    "ServedRewardError",
    "build_reward",
    "describe_rewards",
    "differentiable",
    "fingerprint_changes",
    "finite_mean",
    "is_url",
    "parse_reward_args",
    "register",
    "reward_fingerprint",
    "reward_names",
]
