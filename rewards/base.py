"""The reward registry: find a reward factory by name and validate what it returns (rewards/__init__.py
builds one from a spec).

A reward maps a batch to one score per sample: ``reward(x0: Tensor[B, ...], c: Tensor[B] | None)
-> Tensor[B]``. A factory takes keyword arguments and returns such a function. Add one with
``@rewards.register("name")``, as a ``"package.module:factory"`` path, or as an entry point in
the group ``rl_diffusion.rewards``; this module imports nothing from the RL code.

A reward function may declare ``fn.max_value`` (a true upper bound, for exact evaluation) and
``fn.differentiable = True`` (``Reward.gradient`` then gives d r / d x0; ``@differentiable`` under
``@register`` declares it for a factory). A spec that is a URL is a reward served by another process
(rewards/remote.py). Every built reward carries a fingerprint (``reward_fingerprint``) that a run records
and checks on resume. What each declaration promises, and what a differentiable reward must not do:
docs/design.md, section 3.
"""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.metadata
import inspect
import json
import re
import sys
from typing import Any, Callable, Optional

import torch

from rl_diffusion.errors import UserError, nearest

RewardFn = Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor]
Factory = Callable[..., RewardFn]

ENTRY_POINT_GROUP = "rl_diffusion.rewards"
_REGISTRY: dict[str, Factory] = {}


class RewardError(UserError):
    """A reward raised, returned the wrong shape, or returned non-finite values."""


class ServedRewardError(RewardError):
    """A served reward failed (server down, timed out, wrong answer); the message names the server."""


def register(name: str) -> Callable[[Factory], Factory]:
    """Decorator registering a reward factory under ``name``; a duplicate name is a ValueError."""

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY:
            raise ValueError(f"reward '{name}' is already registered")
        _REGISTRY[name] = factory
        return factory

    return decorate


def differentiable(factory: Factory) -> Factory:
    """Decorator declaring ``differentiable = True`` on the factory (for the listing) and on each reward it returns."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> RewardFn:
        fn = factory(*args, **kwargs)
        fn.differentiable = True  # type: ignore[attr-defined]
        return fn

    build.differentiable = True  # type: ignore[attr-defined]
    return build


class Reward:
    """A built reward that checks every result, so a broken reward is reported by name.

    ``__call__`` returns float32 scores of shape (B,), still attached to x0's autograd graph.
    With ``skip_nonfinite=True``, nan/inf scores are returned instead of raising; the caller must
    mask them with ``torch.isfinite``.
    """

    def __init__(
        self,
        name: str,
        fn: RewardFn,
        kwargs: dict[str, Any] | None = None,
        skip_nonfinite: bool = False,
        fingerprint: dict | None = None,
    ) -> None:
        self.name = name
        self.fn = fn
        self.kwargs = dict(kwargs or {})
        self.skip_nonfinite = skip_nonfinite
        self.fingerprint = fingerprint or {"name": name, "arguments": jsonable(self.kwargs)}

    def __repr__(self) -> str:
        return f"Reward({self.name!r}, {self.kwargs!r})"

    @property
    def max_value(self) -> float | None:
        """The reward's declared upper bound over every x0 (``fn.max_value``), or None if it declares none."""
        bound = getattr(self.fn, "max_value", None)
        return None if bound is None else float(bound)

    @property
    def differentiable(self) -> bool:
        """Whether the reward declares a useful gradient d r / d x0 (``fn.differentiable``)."""
        return bool(getattr(self.fn, "differentiable", False))

    @property
    def components(self) -> dict[str, torch.Tensor]:
        """A weighted sum's (rewards/weighted.py) unweighted component scores [B] of the last call, by label."""
        return dict(getattr(self.fn, "last_components", {}))

    @property
    def missing(self) -> int:
        """Samples of the last call that a served reward could not score (nan; --on-reward-failure skip)."""
        return int(getattr(self.fn, "missing", 0))

    def __call__(self, x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        try:
            r = self.fn(x0, c)
        except ServedRewardError:
            raise  # it names the server and the cause already
        except Exception as e:
            raise RewardError(f"reward '{self.name}' raised {one_line(e)}") from e
        expected = (x0.shape[0],)
        if not isinstance(r, torch.Tensor) or tuple(r.shape) != expected:
            got = tuple(r.shape) if isinstance(r, torch.Tensor) else f"a {type(r).__name__}, not a Tensor"
            raise RewardError(f"reward '{self.name}' returned shape {got}, expected (B,) = {expected}")
        r = r.to(torch.float32)
        bad = int((~torch.isfinite(r)).sum())
        if bad and not self.skip_nonfinite:
            raise RewardError(
                f"reward '{self.name}' returned {bad} non-finite value(s) (nan/inf) in a "
                f"batch of {expected[0]}; fix the reward, or pass --skip-nonfinite-rewards to drop such samples"
            )
        return r

    def gradient(self, x0: torch.Tensor, c: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(rewards [B] float32, detached; d r_b / d x0_b, shaped and typed like x0), even under torch.no_grad.

        Samples score independently, so the gradient of the summed rewards is each sample's own.
        A non-finite gradient is a RewardError unless ``skip_nonfinite``; then a sample whose reward
        or gradient is non-finite gets reward nan and gradient nan, so ``torch.isfinite(rewards)``
        masks both.
        """
        if not self.differentiable:
            raise RewardError(
                f"reward '{self.name}' is not differentiable; fine-tuning through the reward (adjoint matching, "
                f"DRaFT) needs its gradient d r / d x0: use a reward marked [differentiable] in `rl-diffusion "
                f"rewards`, or declare fn.differentiable = True on a reward that is a torch function of x0"
            )
        x = x0.detach().clone().requires_grad_(True)
        with torch.enable_grad():
            r = self(x, c)
            if not r.requires_grad:
                raise RewardError(
                    f"reward '{self.name}' declares differentiable = True but its score does not depend on x0 "
                    f"through autograd; remove torch.no_grad, detach and numpy between x0 and the score"
                )
            (grad,) = torch.autograd.grad(r.sum(), x)
        bad = ~(torch.isfinite(r.detach()) & torch.isfinite(grad).flatten(1).all(dim=1))
        if not bad.any():
            return r.detach(), grad
        if not self.skip_nonfinite:
            raise RewardError(
                f"reward '{self.name}' has a non-finite gradient (nan/inf) for {int(bad.sum())} sample(s) in a "
                f"batch of {len(bad)}; fix the reward, or pass --skip-nonfinite-rewards to drop such samples"
            )
        rows = bad.view(-1, *[1] * (grad.dim() - 1))  # broadcasts over each sample's coordinates
        return r.detach().masked_fill(bad, torch.nan), grad.masked_fill(rows, torch.nan)


def finite_mean(rewards: torch.Tensor) -> float:
    """Mean of the finite entries of rewards [B] (a reward built with skip_nonfinite may return nan/inf)."""
    return rewards[torch.isfinite(rewards)].mean().item()


def _entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    return {ep.name: ep for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)}


def one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())}"


def _import_factory(spec: str) -> Factory:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise UserError(f"reward path '{spec}' must look like 'package.module:factory'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # a plugin's import can fail in any way; report it, not crash
        raise UserError(f"reward plugin '{spec}' could not be imported: {one_line(e)}") from e
    if not hasattr(module, attr):
        raise UserError(
            f"reward plugin '{spec}': module '{module_name}' has no attribute '{attr}'{nearest(attr, dir(module))}"
        )
    return getattr(module, attr)


def _load_entry_point(ep: importlib.metadata.EntryPoint) -> Factory:
    try:
        return ep.load()
    except Exception as e:
        raise UserError(
            f"reward plugin '{ep.name}' (entry point '{ep.value}') could not be imported: {one_line(e)}"
        ) from e


def _find_factory(spec: str) -> Factory:
    if spec in _REGISTRY:
        return _REGISTRY[spec]
    if ":" in spec:
        return _import_factory(spec)
    eps = _entry_points()
    if spec in eps:
        return _load_entry_point(eps[spec])
    names = reward_names()
    raise UserError(
        f"unknown reward '{spec}'{nearest(spec, names)}; known: {', '.join(names)}; add one "
        f"with @rewards.register('name'), a 'package.module:factory' path, or an entry "
        f"point in group '{ENTRY_POINT_GROUP}'"
    )


def _check_kwargs(name: str, factory: Factory, kwargs: dict[str, Any]) -> None:
    try:
        params = list(inspect.signature(factory).parameters.values())
    except (TypeError, ValueError):  # some callables (C builtins) have no signature to check
        return
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return
    accepted = [p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise UserError(
            f"reward '{name}' got unknown argument(s) {', '.join(unknown)}"
            f"{nearest(unknown[0], accepted)}; it accepts: {', '.join(accepted) or 'none'}"
        )


URL_SCHEMES = ("http://", "https://")  # a reward spec starting with one is served by another process


def is_url(spec: str) -> bool:
    return spec.startswith(URL_SCHEMES)


def jsonable(value: Any) -> Any:
    """value as it reads back from JSON (tuples become lists), so a fingerprint compares equal to a saved one."""
    return json.loads(json.dumps(value, sort_keys=True, default=repr))


@functools.lru_cache(maxsize=None)
def _distribution_versions() -> dict[str, str]:
    """Top-level module -> version of the installed distribution providing it."""
    versions = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        try:
            versions[module] = importlib.metadata.version(dists[0])
        except importlib.metadata.PackageNotFoundError:
            pass
    return versions


def _factory_version(factory: Factory) -> str | None:
    top = (getattr(inspect.unwrap(factory), "__module__", None) or "").partition(".")[0]
    if top in ("rewards", "rl_diffusion"):  # the built-ins ship with this package, installed or not
        from rl_diffusion import __version__

        return __version__
    module = sys.modules.get(top)
    return _distribution_versions().get(top) or getattr(module, "__version__", None)


def _source_sha256(factory: Factory) -> str | None:
    """sha256 of the factory's source (inspect.getsource, which unwraps @differentiable); None if it has none.

    Only the factory's own text: a change in a helper it calls goes unseen, while a change to another
    reward in the same module does not block a resume.
    """
    try:
        source = inspect.getsource(factory)
    except (OSError, TypeError):  # built in C, or defined at an interactive prompt
        return None
    return hashlib.sha256(source.encode()).hexdigest()


def reward_fingerprint(name: str, factory: Factory, kwargs: dict[str, Any]) -> dict:
    """What identifies a built reward: name, arguments, version (of the distribution providing it) and the
    sha256 of its factory's source. JSON-ready; a run's config.json records it."""
    return {
        "name": name,
        "arguments": jsonable(kwargs),
        "version": _factory_version(factory),
        "source_sha256": _source_sha256(factory),
    }


def fingerprint_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """'key: old -> new' for each fingerprint entry that differs, nested entries (a weighted sum's components)
    as 'label.key'; hashes shortened to 12 characters."""

    def show(value: Any) -> str:
        text = json.dumps(value, sort_keys=True)
        return text[1:13] if isinstance(value, str) and len(value) == 64 else text

    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict) and key != "arguments":
            changes += fingerprint_changes(a, b, f"{prefix}{key}.")
        elif a != b:
            changes.append(f"{prefix}{key}: {show(a)} -> {show(b)}")
    return changes


def reward_names() -> list[str]:
    """Sorted names of registered rewards and of those in the entry-point group."""
    return sorted(set(_REGISTRY) | set(_entry_points()))


def _arg_docs(doc: str) -> dict[str, str]:
    """``name: text`` entries of a Google-style ``Args:`` section of a cleaned (getdoc) docstring."""
    lines = doc.splitlines()
    if "Args:" not in lines:
        return {}
    docs: dict[str, str] = {}
    indent, current = 0, ""
    for line in lines[lines.index("Args:") + 1 :]:
        depth = len(line) - len(line.lstrip())
        if line.strip() and depth == 0:
            break  # an unindented line starts the next section
        match = re.match(r"(\w+)\s*(?:\([^)]*\))?:\s*(.*)", line.strip())
        if match and (not current or depth == indent):
            indent, current = depth, match[1]
            docs[current] = match[2]
        elif current and line.strip():
            docs[current] += " " + line.strip()
    return docs


def describe_rewards() -> str:
    """Human-readable listing: each reward, its summary line, and its arguments with defaults.

    A reward whose factory declares ``differentiable`` (see ``differentiable``) is marked
    [differentiable]; the last line explains the marker.
    """
    out: list[str] = []
    eps = _entry_points()
    for name in reward_names():
        try:
            factory = _REGISTRY[name] if name in _REGISTRY else _load_entry_point(eps[name])
        except UserError as e:
            out.append(f"{name}\n    (could not be loaded: {e})")
            continue
        doc = inspect.getdoc(factory) or ""
        marker = " [differentiable]" if getattr(factory, "differentiable", False) else ""
        out.append(f"{name}{marker}: {doc.splitlines()[0] if doc else '(no description)'}")
        arg_docs = _arg_docs(doc)
        for p in inspect.signature(factory).parameters.values():
            default = "required" if p.default is p.empty else f"default {p.default!r}"
            text = f": {arg_docs[p.name]}" if p.name in arg_docs else ""
            out.append(f"    {p.name} ({default}){text}")
    out.append(
        "\n[differentiable]: the reward gives its gradient d r / d x0, which fine-tuning through the reward "
        "(adjoint matching, DRaFT) needs."
    )
    return "\n".join(out)


def parse_reward_args(items: list[str]) -> dict[str, Any]:
    """Parse ``key=value`` items; values are JSON where they parse ('1.5', '[0, 1]'), else strings.

    A later item overrides an earlier one with the same key.
    """
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--reward-arg expects key=value, got '{item}'")
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


# Imported last: the built-ins use `register` from this module.
