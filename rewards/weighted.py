"""A weighted sum of rewards: ``--reward "0.7*in_region+0.3*target_point"``.

The spec is terms joined by ``+``; each term is ``[WEIGHT*][LABEL=]REWARD``, WEIGHT a plain decimal
(``0.7``, ``2``, ``-1.5``; default 1), REWARD any single spec build_reward takes (a registered name,
'package.module:factory', an entry point, or the URL of a served reward), LABEL its name in logs and
arguments (default: REWARD). Each component's keyword arguments are ``LABEL:KEY=VALUE`` items of the
reward's arguments (``--reward-arg target_point:point=[1,0]``), so the sum lives in the two existing
fields, ``reward`` and ``reward_args``, and works wherever a reward does: finetune, evaluate, the env,
serve-reward.

A sum is differentiable when every component is; it declares max_value (sum of weight x max_value)
when every weight is >= 0 and every component declares one. After each call ``fn.last_components``
holds each component's own (unweighted) scores [B], which fine-tuning logs as
``reward/component/<label>/mean``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from rewards.base import Reward, jsonable
from rl_diffusion.errors import UserError, nearest

_WEIGHT = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*\*\s*(.*)$")


def is_weighted_sum(spec: str) -> bool:
    """A spec with '+' between terms, or one weighted term ('2*in_region')."""
    return "+" in spec or _WEIGHT.match(spec) is not None


def parse_terms(spec: str) -> list[tuple[str, float, str]]:
    """(label, weight, reward spec) of each term of a weighted-sum spec."""
    terms: list[tuple[str, float, str]] = []
    for raw in spec.split("+"):
        term = raw.strip()
        match = _WEIGHT.match(term)
        weight, rest = (float(match[1]), match[2].strip()) if match else (1.0, term)
        label, sep, name = rest.partition("=")
        label, name = (label.strip(), name.strip()) if sep else (rest, rest)
        if not label or not name or "*" in name:
            raise UserError(
                f"--reward '{spec}': term '{term}' is not [WEIGHT*][LABEL=]REWARD; write a sum of rewards like "
                "'0.7*in_region+0.3*target_point' (weights are plain decimals)"
            )
        if not math.isfinite(weight):
            raise UserError(f"--reward '{spec}': weight {weight} of '{label}' must be finite")
        if any(label == other for other, _, _ in terms):
            raise UserError(
                f"--reward '{spec}': label '{label}' is used twice; name each term, "
                f"e.g. 0.5*left={name}+0.5*right={name}"
            )
        terms.append((label, weight, name))
    return terms


def split_args(spec: str, labels: list[str], kwargs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Each label's keyword arguments from ``LABEL:KEY`` keys."""
    out: dict[str, dict[str, Any]] = {label: {} for label in labels}
    for key, value in kwargs.items():
        label, colon, name = key.rpartition(":")  # the label itself may be a module:factory path
        if not colon or label not in out:
            raise UserError(
                f"--reward-arg '{key}' of the sum '{spec}' names no term{nearest(label, labels) if colon else ''}; "
                f"give each term's arguments as LABEL:KEY=VALUE with LABEL one of {', '.join(labels)}"
            )
        out[label][name] = value
    return out


class WeightedSum:
    """fn(x0, c) = sum_i w_i r_i(x0, c) over built component Rewards (each validated by its own name)."""

    def __init__(self, components: list[tuple[str, float, Reward]]) -> None:
        self.components = components
        self.differentiable = all(r.differentiable for _, _, r in components)
        bounds = [r.max_value for _, _, r in components]
        if all(w >= 0 for _, w, _ in components) and all(b is not None for b in bounds):
            self.max_value = sum(w * b for (_, w, _), b in zip(components, bounds, strict=True))
        self.last_components: dict[str, torch.Tensor] = {}
        self.missing = 0

    def __call__(self, x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        scores = {label: reward(x0, c) for label, _, reward in self.components}
        missing = torch.zeros(x0.shape[0], dtype=torch.bool)
        for label, _, reward in self.components:  # a served component's failed samples are nan in its scores
            if reward.missing:
                missing |= torch.isnan(scores[label]).cpu()
        self.missing = int(missing.sum())
        self.last_components = {label: s.detach() for label, s in scores.items()}
        return sum(w * scores[label] for label, w, _ in self.components)


def weighted_sum(
    spec: str,
    kwargs: dict[str, Any] | None,
    components: list[tuple[str, float, Reward]],
    *,
    skip_nonfinite: bool,
    on_failure: str,
) -> Reward:
    """The Reward of the sum `spec` over its built terms (label, weight, Reward), with a fingerprint of each."""
    if on_failure == "skip":
        skip_nonfinite = True  # a served component's missing samples (nan) must pass the sum's own check
    fingerprint = {
        "name": spec,
        "components": {label: {"weight": weight, **reward.fingerprint} for label, weight, reward in components},
    }
    return Reward(
        spec, WeightedSum(components), kwargs, skip_nonfinite=skip_nonfinite, fingerprint=jsonable(fingerprint)
    )
