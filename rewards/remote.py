"""Rewards served from another process over HTTP: the server (`rl-diffusion serve-reward NAME`) and the
client (`--reward http://HOST:PORT`).

Both sides live here, in the rewards package, because they share the wire format, and because the
client is built by ``rewards.build_reward``, which must not import the RL code: a URL then works wherever
a reward name does (finetune, evaluate, the env, frontier, ablate). Only the standard library speaks HTTP,
so serving a reward needs nothing beyond what training needs.

The wire format (protocol 1: ``POST /score`` and ``GET /info``), which failures the client retries, and
its timeouts and backoff: docs/design.md, section 3. A chunk that fails every try is never scored 0:
``on_failure="stop"`` raises a ServedRewardError, ``"skip"`` returns nan for its samples and counts them
in ``fn.missing``.
"""

from __future__ import annotations

import http.client
import json
import math
import signal
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

from rewards.base import Reward, ServedRewardError, one_line
from rl_diffusion.errors import UserError, nearest

PROTOCOL = 1
MAGIC = b"RLDR"
FLOAT32 = 1
HEADER = struct.Struct("<4sBBBB")
MAX_NDIM = 8
MAX_BODY = 1 << 30  # bytes; a larger body is refused unread, and the client sizes its chunks to stay below
IDLE_SECONDS = 120  # a keep-alive connection with no request for this long is closed: no handler waits forever
CLIENT_ARGS = {"timeout": 60.0, "retries": 3, "backoff": 0.5, "batch": 4096}


# ---------------------------------------------------------------- wire format


def encode_batch(x0: torch.Tensor, c: torch.Tensor | None) -> bytes:
    """The body of POST /score for x0 [B, ...] (sent as float32) and labels c [B] or None."""
    x = x0.detach().to("cpu", torch.float32).contiguous()
    parts = [
        HEADER.pack(MAGIC, PROTOCOL, FLOAT32, x.dim(), c is not None),
        struct.pack(f"<{x.dim()}I", *x.shape),
        x.numpy().astype("<f4", copy=False).tobytes(),
    ]
    if c is not None:
        parts.append(c.detach().to("cpu", torch.int64).contiguous().numpy().astype("<i8", copy=False).tobytes())
    return b"".join(parts)


def decode_batch(body: bytes) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(x0 [B, ...] float32, c [B] int64 or None) of a POST /score body; ValueError says what is malformed."""
    if len(body) < HEADER.size:
        raise ValueError(f"body of {len(body)} bytes is shorter than the {HEADER.size}-byte header")
    magic, protocol, dtype, ndim, has_labels = HEADER.unpack_from(body)
    if magic != MAGIC or protocol != PROTOCOL:
        raise ValueError(f"not a protocol {PROTOCOL} batch (magic {magic!r}, protocol {protocol})")
    if dtype != FLOAT32 or not 1 <= ndim <= MAX_NDIM or has_labels > 1:
        raise ValueError(f"unsupported batch: dtype {dtype}, ndim {ndim}, has_labels {has_labels}")
    shape = struct.unpack_from(f"<{ndim}I", body, HEADER.size)
    offset = HEADER.size + 4 * ndim
    count = math.prod(shape)
    expected = offset + 4 * count + 8 * shape[0] * has_labels
    if len(body) != expected:
        raise ValueError(f"a batch of shape {list(shape)} takes {expected} bytes, the body has {len(body)}")
    x = np.frombuffer(body, "<f4", count, offset).astype(np.float32).reshape(shape)
    c = None
    if has_labels:
        c = torch.from_numpy(np.frombuffer(body, "<i8", shape[0], offset + 4 * count).astype(np.int64))
    return torch.from_numpy(x), c


def decode_rewards(data: bytes) -> torch.Tensor:
    return torch.from_numpy(np.frombuffer(data, "<f4").astype(np.float32))


# ---------------------------------------------------------------- server


class RewardServer(ThreadingHTTPServer):
    """Serves ``score(x0, c) -> rewards [B]`` at POST /score and ``info`` at GET /info.

    Batches are scored one at a time (a lock): a reward function need not be thread-safe, and a model
    on one accelerator gains nothing from interleaved calls. With ``max_batches`` > 0 the server shuts
    itself down after that many POST /score requests (tests, benchmarks); ``shutdown()`` stops it too.
    """

    # server_close() joins every thread the server started: one still ending while the process exits may drop
    # the last reference to the reward, whose tensors then free without the interpreter's lock, which aborts
    # the process in C++ ("terminate called without an active exception"); idle keep-alive connections are
    # shut first, so the join never waits on a client
    daemon_threads = False
    block_on_close = True
    handler: type[BaseHTTPRequestHandler]  # _Handler, set below; tests serve misbehaving subclasses

    def __init__(
        self,
        score: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor],
        info: dict,
        host: str = "127.0.0.1",
        port: int = 0,
        max_batches: int = 0,
        device: str | torch.device = "cpu",
    ) -> None:
        try:
            super().__init__((host, port), self.handler)
        except OSError as e:
            raise UserError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None
        self.score, self.info, self.max_batches = score, info, max_batches
        self.device = torch.device(device)
        self.batches = 0
        self.score_lock = threading.Lock()
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        self.stopper: threading.Thread | None = None  # calls shutdown() once --max-batches is reached

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}"

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def server_close(self) -> None:
        with self.connections_lock:  # a handler waiting for a client's next request reads EOF and ends
            for connection in self.connections:
                try:
                    connection.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass  # already gone
        super().server_close()
        if self.stopper is not None:
            self.stopper.join()

    def handle_error(self, request: Any, client_address: Any) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # a client that hung up is no server error
            super().handle_error(request, client_address)

    def count_batch(self) -> bool:
        """Count one POST /score; True when it was the last one --max-batches allows."""
        with self.score_lock:
            self.batches += 1
            return 0 < self.max_batches <= self.batches


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: a client sends its chunks over one connection
    # the status line and headers, then the body, are two writes: with Nagle on, each small answer would wait
    # for the client's delayed ACK (40 ms on Linux)
    disable_nagle_algorithm = True
    timeout = IDLE_SECONDS
    server: RewardServer

    def log_message(self, format: str, *args: Any) -> None:
        pass  # one line per batch would drown the server's output

    def _send(self, status: int, body: bytes, content_type: str = "text/plain; charset=utf-8") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self._send(status, (" ".join(message.split()) + "\n").encode())

    def do_GET(self) -> None:
        if self.path != "/info":
            self._error(404, f"no {self.path} here; try GET /info or POST /score")
            return
        self._send(200, json.dumps(self.server.info).encode(), "application/json")

    def do_POST(self) -> None:
        if self.path != "/score":
            self.close_connection = True  # the body is left unread: the connection cannot be reused
            self._error(404, f"no {self.path} here; try GET /info or POST /score")
            return
        last = self.server.count_batch()
        if last:
            self.close_connection = True
        try:
            self._score()
        finally:
            if last:  # shutdown() waits for serve_forever, which runs in another thread: call it from a third
                self.server.stopper = threading.Thread(target=self.server.shutdown)
                self.server.stopper.start()

    def _score(self) -> None:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True  # the body's end is unknown: the connection cannot be reused
            self._error(411, "POST /score needs a Content-Length")
            return
        if not 0 < length <= MAX_BODY:
            self.close_connection = True
            self._error(413, f"a body of {length} bytes is outside (0, {MAX_BODY}]; send smaller chunks")
            return
        body = self.rfile.read(length)
        try:
            x0, c = decode_batch(body)
        except ValueError as e:
            self._error(400, f"malformed batch: {e}")
            return
        try:
            with self.server.score_lock, torch.no_grad():
                rewards = self.server.score(x0.to(self.server.device), None if c is None else c.to(self.server.device))
            data = rewards.detach().to("cpu", torch.float32).numpy().astype("<f4", copy=False).tobytes()
        except (MemoryError, torch.OutOfMemoryError) as e:  # may pass once other work frees memory: retried
            self._error(503, one_line(e))
        except Exception as e:  # the reward's own failure: deterministic for this batch, so the client does not retry
            self._error(422, one_line(e))
        else:
            self._send(200, data, "application/octet-stream")


RewardServer.handler = _Handler


def reward_info(reward: Reward) -> dict:
    """GET /info of a served reward."""
    return {
        "protocol": PROTOCOL,
        "fingerprint": reward.fingerprint,
        "differentiable": False,
        "max_value": reward.max_value,
    }


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def serve(
    reward: Reward,
    host: str = "127.0.0.1",
    port: int = 8765,
    max_batches: int = 0,
    device: str = "cpu",
    out=sys.stdout,
) -> None:
    """`rl-diffusion serve-reward`: serve a built reward until Ctrl-C or --max-batches. Build it with
    skip_nonfinite=True: nan passes through, and the client decides, by its own --skip-nonfinite-rewards,
    whether it stops a run."""
    if max_batches < 0:
        raise UserError(f"--max-batches must be >= 0 (0 = no limit), got {max_batches}")
    name = reward.name
    server = RewardServer(reward, reward_info(reward), host, port, max_batches, device)
    if threading.current_thread() is threading.main_thread():  # a supervisor's SIGTERM stops it like Ctrl-C
        signal.signal(signal.SIGTERM, _interrupt)
    print(f"serving reward '{name}' on {server.url} (POST /score, GET /info); Ctrl-C stops", file=out, flush=True)
    try:
        server.serve_forever(poll_interval=0.2)
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print(f"stopped after {server.batches} batch(es)", file=out, flush=True)


# ---------------------------------------------------------------- client


class _Unavailable(Exception):
    """A chunk that failed every try: the server did not answer, answered 5xx, or timed out."""


class RemoteRewardFn:
    """The reward function of a served reward: ``fn(x0, c) -> rewards [B] float32`` on x0's device.

    ``missing``: samples of the last call whose chunk failed every try (nan in the result; skip mode).
    """

    differentiable = False

    def __init__(
        self,
        url: str,
        timeout: float,
        retries: int,
        backoff: float,
        batch: int,
        skip_nonfinite: bool = False,
        on_failure: str = "stop",
    ) -> None:
        self.url = url.rstrip("/")
        parts = urlsplit(self.url)
        if not parts.hostname or parts.path or parts.query:
            raise UserError(f"--reward {url}: expected http://HOST:PORT (a served reward), got a path or no host")
        try:
            port = parts.port
        except ValueError as e:
            raise UserError(f"--reward {url}: {e}") from None
        self.https = parts.scheme == "https"
        self.host, self.port = parts.hostname, port
        self.timeout, self.retries, self.backoff, self.batch = timeout, retries, backoff, batch
        self.skip_nonfinite, self.on_failure = skip_nonfinite, on_failure
        self.missing = 0
        self._conn: http.client.HTTPConnection | None = None
        self._lock = threading.Lock()  # one connection: callers take turns
        try:
            status, data = self._request("GET", "/info", None)
        except _Unavailable as e:
            raise UserError(
                f"no reward server answered at {self.url}: {e}; start one with "
                "`rl-diffusion serve-reward NAME --port P`"
            ) from None
        try:
            self.info = json.loads(data) if status == 200 else None
        except ValueError:
            self.info = None
        if not isinstance(self.info, dict) or self.info.get("protocol") != PROTOCOL:
            raise UserError(
                f"{self.url} is not a protocol {PROTOCOL} reward server (GET /info answered {status}: "
                f"{data[:80]!r}); serve the reward with `rl-diffusion serve-reward` of this version"
            )
        self.max_value = self.info.get("max_value")
        if self.max_value is None:
            del self.max_value  # Reward.max_value reads getattr(fn, "max_value", None)

    def __repr__(self) -> str:
        return f"RemoteRewardFn({self.url!r})"

    def close(self) -> None:
        with self._lock:
            self._drop()

    def _drop(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _connection(self) -> http.client.HTTPConnection:
        if self._conn is None:
            kind = http.client.HTTPSConnection if self.https else http.client.HTTPConnection
            self._conn = kind(self.host, self.port, timeout=self.timeout)
        return self._conn

    def _request(self, method: str, path: str, body: bytes | None) -> tuple[int, bytes]:
        """(status, body) of the first try answered with a status below 500; _Unavailable after 1 + retries."""
        cause, tries, attempt, reconnected = "", 1 + self.retries, 0, False
        while attempt < tries:
            reused = self._conn is not None
            try:
                conn = self._connection()
                headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
                conn.request(method, path, body=body, headers=headers)
                response = conn.getresponse()
                data = response.read()
                if response.will_close:
                    self._drop()
            except TimeoutError:
                self._drop()  # a late answer would be read as the next request's: start afresh
                cause = f"no answer within --reward-arg timeout={self.timeout:g} s"
            except (OSError, http.client.HTTPException) as e:
                self._drop()
                if reused and not reconnected and isinstance(e, (ConnectionResetError, BrokenPipeError)):
                    # the server (or a proxy) closed a keep-alive connection that sat idle between epochs:
                    # no failure of the server, so a new connection, without a try or a backoff
                    reconnected = True
                    continue
                cause = one_line(e)
            else:
                if response.status < 500:
                    return response.status, data
                cause = f"HTTP {response.status}: {data.decode(errors='replace').strip()[:200]}"
            attempt += 1
            if attempt < tries:
                time.sleep(self.backoff * 2 ** (attempt - 1))
        raise _Unavailable(f"{cause} ({tries} tr{'y' if tries == 1 else 'ies'})")

    def _score_chunk(self, x0: torch.Tensor, c: torch.Tensor | None) -> torch.Tensor:
        status, data = self._request("POST", "/score", encode_batch(x0, c))
        if status != 200:
            text = data.decode(errors="replace").strip()[:300]
            raise ServedRewardError(f"reward server {self.url} refused a batch of {len(x0)} (HTTP {status}): {text}")
        if len(data) != 4 * len(x0):
            raise ServedRewardError(
                f"reward server {self.url} returned {len(data)} bytes for a batch of {len(x0)}, expected "
                f"{4 * len(x0)} (one float32 per sample): the server's reward returns the wrong shape"
            )
        return decode_rewards(data)

    def __call__(self, x0: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        n = x0.shape[0]
        rewards = torch.empty(n, dtype=torch.float32)
        failed = torch.zeros(n, dtype=torch.bool)
        # samples per request: at most `batch`, and few enough that a body stays below the server's MAX_BODY
        per_sample = 4 * math.prod(x0.shape[1:]) + 8
        step = max(1, min(self.batch, (MAX_BODY - 4096) // per_sample))
        with self._lock:
            for start in range(0, n, step):
                end = min(n, start + step)
                try:
                    rewards[start:end] = self._score_chunk(x0[start:end], None if c is None else c[start:end])
                except _Unavailable as e:
                    if self.on_failure == "stop":
                        raise ServedRewardError(
                            f"reward server {self.url} failed to score {end - start} sample(s): {e}"
                        ) from None
                    print(
                        f"warning: reward server {self.url} failed to score {end - start} sample(s): {e}; "
                        "they are dropped (--on-reward-failure skip) and counted in reward/missing",
                        file=sys.stderr,
                    )
                    rewards[start:end], failed[start:end] = torch.nan, True
        self.missing = int(failed.sum())
        bad = int((~torch.isfinite(rewards) & ~failed).sum())
        if bad and not self.skip_nonfinite:  # the reward's own nan; the Reward around us may tolerate nan for skip
            raise ServedRewardError(
                f"reward server {self.url} returned {bad} non-finite value(s) (nan/inf) in a batch of {n}; fix the "
                "reward, or pass --skip-nonfinite-rewards to drop such samples"
            )
        return rewards.to(x0.device)


def build_remote(
    url: str, kwargs: dict | None = None, *, skip_nonfinite: bool = False, on_failure: str = "stop"
) -> Reward:
    """The Reward that scores through the server at ``url``; kwargs are the client's: timeout (s per socket
    operation), retries, backoff (s, doubled per retry), batch (samples per request). The served reward's
    own arguments are the server's (serve-reward --reward-arg)."""
    if on_failure not in ("stop", "skip"):
        raise UserError(f"unknown --on-reward-failure '{on_failure}'; choose stop or skip")
    kwargs = dict(kwargs or {})
    unknown = sorted(set(kwargs) - set(CLIENT_ARGS))
    if unknown:
        raise UserError(
            f"served reward {url} got unknown argument(s) {', '.join(unknown)}{nearest(unknown[0], CLIENT_ARGS)}; "
            f"the client accepts {', '.join(CLIENT_ARGS)}; the reward's own arguments are given to "
            "`rl-diffusion serve-reward NAME --reward-arg KEY=VALUE`"
        )
    args = {**CLIENT_ARGS, **kwargs}
    checks = {
        "timeout": args["timeout"] > 0,
        "retries": isinstance(args["retries"], int) and args["retries"] >= 0,
        "backoff": args["backoff"] >= 0,
        "batch": isinstance(args["batch"], int) and args["batch"] >= 1,
    }
    for key, ok in checks.items():
        if not isinstance(args[key], (int, float)) or isinstance(args[key], bool) or not ok:
            raise UserError(f"served reward {url}: --reward-arg {key}={args[key]!r} is out of range")
    fn = RemoteRewardFn(
        url,
        float(args["timeout"]),
        args["retries"],
        float(args["backoff"]),
        args["batch"],
        skip_nonfinite=skip_nonfinite,
        on_failure=on_failure,
    )
    # skip mode returns nan for missing samples, which the Reward around it must let through
    tolerant = skip_nonfinite or on_failure == "skip"
    return Reward(url, fn, kwargs, skip_nonfinite=tolerant, fingerprint=fn.info.get("fingerprint"))


def served(reward: Reward) -> bool:
    """Whether the reward, or a component of a weighted sum of rewards, is scored by a server."""
    components = getattr(reward.fn, "components", None)
    if components is not None:
        return any(served(r) for _, _, r in components)
    return isinstance(reward.fn, RemoteRewardFn)
