"""The FLOPs a workload spends in matrix products, and the FLOP/s this machine attains on the same products.

`record_matmuls(fn)` runs fn once and records every matrix product and convolution it dispatches, forward
and backward (the ops `torch.utils.flop_counter` has a formula for), by operator and operand sizes and
strides. Their FLOPs are FlopCounterMode's count (2 per multiply-add), not a formula of ours: the
network's layers never have to be listed by hand, and the MLP's count matches its layer shapes
(tests/test_flops.py). Elementwise work is not counted: activations, norms, the sinusoidal embeddings,
AdamW, the sampler's own arithmetic.

`replay_seconds(ops)` is the ceiling: the same products, each on tensors of its recorded sizes and strides,
called back to back from a tight loop. A workload's FLOPs over its wall time, divided by the FLOPs of the
replay over the replay's time, is the fraction of the attainable it reaches; the rest of its time goes to
what the replay leaves out (Python and dispatch around each op, elementwise kernels streaming memory,
uncounted work). `peak_flops_per_sec` gives the machine's large-matrix peak, for the shapes' own share.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry


@dataclass(frozen=True)
class TensorSpec:
    """What a replay needs of an operand: sizes, strides, dtype, device."""

    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: str

    def make(self) -> torch.Tensor:
        """A tensor of these sizes and strides (expanded or transposed views included) with random values."""
        span = 1 + sum((n - 1) * s for n, s in zip(self.size, self.stride, strict=True)) if all(self.size) else 0
        storage = torch.randn(span, device=self.device).to(self.dtype)
        return storage.as_strided(self.size, self.stride)


@dataclass(frozen=True)
class MatmulOp:
    """One kind of product a workload ran: the operator, its arguments with TensorSpecs for tensors."""

    func: Any  # a torch._ops.OpOverload
    args: tuple
    kwargs: tuple  # sorted (name, value) pairs, so that equal calls hash equal

    def materialize(self) -> tuple[tuple, dict]:
        def make(v):
            if isinstance(v, tuple):
                return tuple(make(x) for x in v)
            return v.make() if isinstance(v, TensorSpec) else v

        return make(self.args), {k: make(v) for k, v in self.kwargs}

    def flops(self) -> int:
        args, kwargs = self.materialize()
        with FlopCounterMode(display=False) as counter:
            self.func(*args, **kwargs)
        return counter.get_total_flops()


def _spec(v):
    """An argument with TensorSpecs for tensors and tuples for lists (hashable; the ops take either)."""
    if isinstance(v, torch.Tensor):
        return TensorSpec(tuple(v.shape), tuple(v.stride()), v.dtype, str(v.device))
    if isinstance(v, (list, tuple)):
        return tuple(_spec(x) for x in v)
    return v


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: Counter[MatmulOp] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.overloadpacket in flop_registry:
            named = tuple(sorted((k, _spec(v)) for k, v in kwargs.items()))
            self.ops[MatmulOp(func, _spec(args), named)] += 1
        else:
            # Under inference_mode composite ops (linear, matmul) arrive whole: decompose them into the
            # products they run, as FlopCounterMode does
            with self:
                decomposed = func.decompose(*args, **kwargs)
            if decomposed is not NotImplemented:
                return decomposed
        return func(*args, **kwargs)


@dataclass
class Matmuls:
    """The products of one run of a workload: each distinct one with how often it ran, and its FLOPs."""

    counts: dict[MatmulOp, int]
    flops_each: dict[MatmulOp, int]

    @property
    def flops(self) -> int:
        return sum(self.flops_each[op] * n for op, n in self.counts.items())

    @property
    def calls(self) -> int:
        return sum(self.counts.values())


def record_matmuls(fn: Callable[[], Any]) -> tuple[Any, Matmuls]:
    """fn()'s result, and the matrix products and convolutions it ran (forward and backward)."""
    recorder = _Recorder()
    with recorder:
        result = fn()
    counts = dict(recorder.ops)
    return result, Matmuls(counts, {op: op.flops() for op in counts})


def replay_seconds(matmuls: Matmuls, min_seconds: float = 0.05) -> float:
    """Seconds the workload's products take called back to back: each distinct product timed on its own
    operands (repeated for at least min_seconds, after one warm-up call), times how often it ran."""
    total = 0.0
    for op, count in matmuls.counts.items():
        args, kwargs = op.materialize()
        op.func(*args, **kwargs)  # warm-up: first-call allocations and kernel selection
        repeats, elapsed = 0, 0.0
        started = time.perf_counter()
        while elapsed < min_seconds or repeats < 3:
            op.func(*args, **kwargs)
            repeats += 1
            elapsed = time.perf_counter() - started
        total += count * elapsed / repeats
    return total


def attainment(matmuls: Matmuls, seconds: float, products: float) -> dict:
    """A workload's FLOPs over its wall `seconds` against the same FLOPs over `products`, the seconds its
    products take replayed back to back (`replay_seconds`)."""
    return {
        "flops": matmuls.flops,
        "product_calls": matmuls.calls,
        "mean_flops_per_product": matmuls.flops / matmuls.calls,
        "achieved_gflops": matmuls.flops / seconds / 1e9,
        "attainable_gflops": matmuls.flops / products / 1e9,
        "fraction_of_attainable": products / seconds,
    }


def peak_flops_per_sec(size: int = 2048, min_seconds: float = 0.5) -> float:
    """FLOP/s of a large square float32 matrix product: the BLAS at its best. (On the reference AMD CPU MKL
    takes its AVX2 path, and oneDNN's convolutions run about twice as fast.)"""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    repeats, started = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - started) < min_seconds or repeats < 3:
        a @ b
        repeats += 1
    return 2 * size**3 * repeats / elapsed
