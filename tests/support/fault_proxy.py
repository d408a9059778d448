"""A fault-injecting HTTP/1.1 reverse proxy for S3 traffic on loopback.

Point a client's ``endpoint_url`` at the proxy; it forwards every request byte for byte to the
upstream S3 server and, for a chosen fraction of requests, injects one fault instead:

==================  ==========================================================================
kind                what the client sees
==================  ==========================================================================
``internal_error``  HTTP 500 with an S3 ``InternalError`` XML body; the request never reaches S3
``slow_down``       HTTP 503 with an S3 ``SlowDown`` XML body; the request never reaches S3
``reset``           TCP reset right after the request head; the request never reaches S3
``reset_after``     the request *is applied* upstream, then the connection is reset part-way
                    through the response: the client cannot tell whether it succeeded (this is
                    the case that makes blind retries of non-idempotent commits dangerous)
``delay``           ``delay_s`` seconds of silence, then normal forwarding (a slow server)
==================  ==========================================================================

Why bytes are relayed verbatim: SigV4 signs the ``Host`` header and the body's hash. The proxy
never rewrites the request head, so the server checks the signature against the same
``Host: 127.0.0.1:<proxy port>`` that the client signed, and it passes. Bodies (Content-Length,
chunked, aws-chunked) stream through in 1 MiB pieces and are never held whole in memory.

Faults are drawn from ``random.Random(seed)`` in request-arrival order, so a given seed produces
the same fault sequence over the sequence of eligible requests. Change settings at runtime with
``proxy.configure(...)`` or, from another process, ``POST /__fault_proxy__/config`` (JSON);
``GET /__fault_proxy__/stats`` returns the counters. (``__fault_proxy__`` cannot be an S3 bucket
name, so it never shadows a real request.)

CLI::

    python -m tools.fault_proxy --upstream http://127.0.0.1:8333 --fraction 0.1 --seed 7
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import json
import random
import re
import select
import signal
import socket
import socketserver
import struct
import sys
import threading
import time
from collections.abc import Iterable
from typing import BinaryIO
from urllib.parse import urlsplit

KINDS = ("internal_error", "slow_down", "reset", "reset_after", "delay")
# The kinds that make a request fail outright; "delay" alone only slows it down.
FAILING_KINDS = ("internal_error", "slow_down", "reset", "reset_after")
CONTROL_PREFIX = "/__fault_proxy__/"
_BUF = 1 << 20
_MAX_HEAD = 64 * 1024
_S3_ERRORS = {
    "internal_error": (500, "Internal Server Error", "InternalError",
                       "We encountered an internal error. Please try again."),
    "slow_down": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
}


@dataclasses.dataclass(frozen=True)
class FaultConfig:
    """What to inject. A value: change it with ``dataclasses.replace`` / ``FaultProxy.configure``."""

    fraction: float = 0.0
    kinds: tuple[str, ...] = FAILING_KINDS
    seed: int = 0
    # Total faults to inject over the proxy's life (None: unlimited). Lets a test say "the first
    # 3 attempts fail, then it heals" or "more faults than the retry budget".
    max_faults: int | None = None
    delay_s: float = 0.5
    # Only requests whose method is in ``methods`` and whose path (with query) matches
    # ``path_pattern`` (re.search) can be faulted; others are always forwarded.
    methods: tuple[str, ...] | None = None
    path_pattern: str | None = None

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"'fraction' must be in [0, 1] (got {self.fraction!r})")
        kinds = (self.kinds,) if isinstance(self.kinds, str) else tuple(self.kinds)
        object.__setattr__(self, "kinds", kinds)
        bad = [k for k in kinds if k not in KINDS]
        if bad or not kinds:
            raise ValueError(f"'kinds' must be a non-empty subset of {KINDS} (got {self.kinds!r})")
        if self.max_faults is not None and self.max_faults < 0:
            raise ValueError(f"'max_faults' must be >= 0 or None (got {self.max_faults!r})")
        if self.delay_s < 0:
            raise ValueError(f"'delay_s' must be >= 0 (got {self.delay_s!r})")
        if self.methods is not None:
            object.__setattr__(self, "methods", tuple(m.upper() for m in self.methods))
        if self.path_pattern is not None:
            re.compile(self.path_pattern)  # fail here, not inside a handler thread


class _Abort(Exception):
    """Stop serving this client connection (peer closed, or a fault was injected)."""


# ------------------------------------------------------------------------------- HTTP framing

def _read_head(rfile: BinaryIO) -> bytes | None:
    """Raw request/response head up to and including the blank line; None on clean EOF."""
    lines = []
    size = 0
    while True:
        line = rfile.readline(_MAX_HEAD + 1)
        if not line:
            if lines:
                raise _Abort("connection closed inside a message head")
            return None
        if not lines and line in (b"\r\n", b"\n"):
            continue  # tolerate stray CRLF between pipelined messages (RFC 9112 2.2)
        lines.append(line)
        size += len(line)
        if size > _MAX_HEAD:
            raise _Abort("message head too large")
        if line in (b"\r\n", b"\n"):
            return b"".join(lines)


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    text = head.decode("latin-1")
    first, *rest = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in rest:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return first, headers


def _copy_exact(rfile: BinaryIO, out: socket.socket | None, n: int, stats: _Stats, key: str) -> None:
    while n > 0:
        chunk = rfile.read(min(n, _BUF))
        if not chunk:
            raise _Abort("peer closed mid-body")
        if out is not None:
            out.sendall(chunk)
        stats.add_bytes(key, len(chunk))
        n -= len(chunk)


def _copy_chunked(rfile: BinaryIO, out: socket.socket | None, stats: _Stats, key: str) -> None:
    """Relay a chunked body verbatim (sizes, extensions, trailers), one chunk at a time."""
    while True:
        line = rfile.readline(4096)
        if not line:
            raise _Abort("peer closed inside a chunked body")
        if out is not None:
            out.sendall(line)
        size = int(line.split(b";", 1)[0].strip() or b"0", 16)
        if size == 0:
            while True:  # trailers, then the final blank line
                t = rfile.readline(_MAX_HEAD)
                if not t:
                    raise _Abort("peer closed inside chunked trailers")
                if out is not None:
                    out.sendall(t)
                if t in (b"\r\n", b"\n"):
                    return
        _copy_exact(rfile, out, size + 2, stats, key)  # data + CRLF


def _copy_body(rfile: BinaryIO, out: socket.socket | None, headers: dict[str, str],
               stats: _Stats, key: str) -> None:
    if "chunked" in headers.get("transfer-encoding", "").lower():
        _copy_chunked(rfile, out, stats, key)
    elif "content-length" in headers:
        _copy_exact(rfile, out, int(headers["content-length"]), stats, key)


def _reset(sock: socket.socket) -> None:
    """Close with a TCP RST (SO_LINGER 0) so the peer sees 'connection reset', not a clean EOF."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        sock.close()


def _error_response(kind: str, request_id: str, *, head_only: bool, close: bool) -> bytes:
    status, reason, code, message = _S3_ERRORS[kind]
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}'
            f"</Message><RequestId>{request_id}</RequestId></Error>").encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\nx-amz-request-id: {request_id}\r\n"
            f"{'Retry-After: 1' + chr(13) + chr(10) if status == 503 else ''}"
            f"Connection: {'close' if close else 'keep-alive'}\r\n\r\n").encode()
    return head if head_only else head + body


# ------------------------------------------------------------------------------------ counters

class _Stats:
    def __init__(self):
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.requests = 0
            self.forwarded = 0
            self.faults: collections.Counter[str] = collections.Counter()
            self.bytes = collections.Counter()
            self.by_method: collections.Counter[str] = collections.Counter()
            # (index, method, path, kind-or-None): bounded, and without headers so no signatures leak.
            self.events: collections.deque = collections.deque(maxlen=10000)

    def add_bytes(self, key: str, n: int) -> None:
        with self._lock:
            self.bytes[key] += n

    def snapshot(self) -> dict:
        with self._lock:
            return {"requests": self.requests, "forwarded": self.forwarded,
                    "faults": sum(self.faults.values()), "faults_by_kind": dict(self.faults),
                    "by_method": dict(self.by_method), "bytes_up": self.bytes["up"],
                    "bytes_down": self.bytes["down"]}


# --------------------------------------------------------------------------------------- proxy

class FaultProxy:
    """Threaded reverse proxy; one upstream connection per client connection (keep-alive kept)."""

    def __init__(self, upstream: str, config: FaultConfig | None = None, *,
                 host: str = "127.0.0.1", port: int = 0, **config_fields):
        u = urlsplit(upstream)
        if u.scheme != "http" or not u.hostname:
            raise ValueError(f"'upstream' must be an http://host:port URL (got {upstream!r})")
        self.upstream = (u.hostname, u.port or 80)
        self._config = dataclasses.replace(config or FaultConfig(), **config_fields)
        self._lock = threading.Lock()
        self._rng = random.Random(self._config.seed)
        self._pattern = re.compile(self._config.path_pattern) if self._config.path_pattern else None
        self._stats = _Stats()
        self._sockets: set[socket.socket] = set()
        self._bind = (host, port)
        self._server: socketserver.ThreadingTCPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle
    def start(self) -> FaultProxy:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                proxy._serve_connection(self.request)

        class Server(socketserver.ThreadingTCPServer):
            daemon_threads = True
            allow_reuse_address = True
            request_queue_size = 128

        self._server = Server(self._bind, Handler)
        self._thread = threading.Thread(target=self._server.serve_forever, name="fault-proxy",
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._server.shutdown()
        self._server.server_close()
        with self._lock:
            socks = list(self._sockets)
        for s in socks:  # unblock handler threads stuck in recv
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            with contextlib.suppress(OSError):
                s.close()
        self._server = None

    def __enter__(self) -> FaultProxy:
        return self.start() if self._server is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("proxy is not started")
        return self._server.server_address[1]

    @property
    def endpoint_url(self) -> str:
        return f"http://{self._bind[0]}:{self.port}"

    # -- control
    @property
    def config(self) -> FaultConfig:
        with self._lock:
            return self._config

    def configure(self, **changes) -> FaultConfig:
        """Change settings now. A new ``seed`` restarts the random sequence."""
        with self._lock:
            new = dataclasses.replace(self._config, **changes)
            if "seed" in changes:
                self._rng = random.Random(new.seed)
            self._pattern = re.compile(new.path_pattern) if new.path_pattern else None
            self._config = new
            return new

    def stats(self) -> dict:
        return self._stats.snapshot()

    def events(self) -> list[tuple[int, str, str, str | None]]:
        with self._stats._lock:
            return list(self._stats.events)

    def reset_stats(self) -> None:
        self._stats.reset()

    # -- per request
    def _decide(self, method: str, target: str) -> str | None:
        with self._lock:
            cfg = self._config
            st = self._stats
            with st._lock:
                idx = st.requests
                st.requests += 1
                st.by_method[method] += 1
            eligible = ((cfg.methods is None or method in cfg.methods)
                        and (self._pattern is None or self._pattern.search(target)))
            kind = None
            if eligible and cfg.fraction > 0:
                # Two draws per eligible request, always, so the sequence depends only on the seed
                # and the number of eligible requests before this one.
                r, k = self._rng.random(), self._rng.randrange(len(cfg.kinds))
                used = sum(st.faults.values())
                if r < cfg.fraction and (cfg.max_faults is None or used < cfg.max_faults):
                    kind = cfg.kinds[k]
            with st._lock:
                if kind:
                    st.faults[kind] += 1
                st.events.append((idx, method, target.split("?")[0], kind))
        return kind

    def _control(self, client: socket.socket, rfile: BinaryIO, method: str, target: str,
                 headers: dict[str, str]) -> None:
        body = b""
        if "content-length" in headers:
            body = rfile.read(int(headers["content-length"]))
        status, payload = 200, {}
        try:
            if target.startswith(CONTROL_PREFIX + "stats"):
                payload = self.stats()
            elif target.startswith(CONTROL_PREFIX + "config") and method == "POST":
                changes = json.loads(body or b"{}")
                for k in ("kinds", "methods"):
                    if isinstance(changes.get(k), list):
                        changes[k] = tuple(changes[k])
                payload = dataclasses.asdict(self.configure(**changes))
            elif target.startswith(CONTROL_PREFIX + "config"):
                payload = dataclasses.asdict(self.config)
            elif target.startswith(CONTROL_PREFIX + "reset-stats") and method == "POST":
                self.reset_stats()
            else:
                status, payload = 404, {"error": f"unknown control path {target}"}
        except (ValueError, TypeError) as e:
            status, payload = 400, {"error": str(e)}
        data = json.dumps(payload).encode()
        client.sendall(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\n"
                       f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                       + data)

    def _connect_upstream(self) -> tuple[socket.socket, BinaryIO]:
        s = socket.create_connection(self.upstream, timeout=300)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._sockets.add(s)
        return s, s.makefile("rb", buffering=_BUF)

    def _serve_connection(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        client.settimeout(300)
        with self._lock:
            self._sockets.add(client)
        crf = client.makefile("rb", buffering=_BUF)
        up: socket.socket | None = None
        urf: BinaryIO | None = None
        try:
            while True:
                head = _read_head(crf)
                if head is None:
                    return
                first, headers = _parse_head(head)
                parts = first.split(" ")
                if len(parts) != 3:
                    raise _Abort(f"bad request line {first[:80]!r}")
                method, target = parts[0].upper(), parts[1]
                if target.startswith(CONTROL_PREFIX):
                    self._control(client, crf, method, target, headers)
                    continue
                kind = self._decide(method, target)
                expect = headers.get("expect", "").lower() == "100-continue"
                if kind in ("internal_error", "slow_down"):
                    rid = f"fault-proxy-{self._stats.requests}"
                    if expect:
                        # The client holds its body until it sees 100 Continue: answer, then close,
                        # since we cannot know whether it will send the body anyway.
                        client.sendall(_error_response(kind, rid, head_only=method == "HEAD", close=True))
                        return
                    _copy_body(crf, None, headers, self._stats, "discarded")
                    client.sendall(_error_response(kind, rid, head_only=method == "HEAD", close=False))
                    continue
                if kind == "reset":
                    _reset(client)
                    return
                if kind == "delay":
                    time.sleep(self.config.delay_s)
                if up is None or _is_closed(up):
                    if up is not None:
                        self._drop(up)
                    up, urf = self._connect_upstream()
                keep = self._forward(client, crf, up, urf, method, head, headers, expect,
                                     partial=kind == "reset_after")
                if not keep:
                    return
        except (_Abort, OSError, ValueError):
            return
        finally:
            with contextlib.suppress(OSError):
                crf.close()
            self._drop(client)
            if up is not None:
                self._drop(up)

    def _drop(self, s: socket.socket) -> None:
        with self._lock:
            self._sockets.discard(s)
        with contextlib.suppress(OSError):
            s.close()

    def _forward(self, client, crf, up, urf, method, head, headers, expect, *, partial) -> bool:
        """One request/response exchange. Returns whether both connections stay usable."""
        up.sendall(head)
        if expect:
            rhead = _read_head(urf)
            if rhead is None:
                raise _Abort("upstream closed")
            status = _status(rhead)
            if status == 100:
                client.sendall(rhead)
                _copy_body(crf, up, headers, self._stats, "up")
                rhead = None
            else:
                # A final answer before the body (e.g. 403): the client may or may not send the
                # body now, so relay the answer and close rather than guess the framing.
                self._relay_response(client, urf, method, rhead, partial=partial)
                return False
        else:
            _copy_body(crf, up, headers, self._stats, "up")
            rhead = None
        with self._stats._lock:
            self._stats.forwarded += 1
        while True:
            if rhead is None:
                rhead = _read_head(urf)
                if rhead is None:
                    raise _Abort("upstream closed before answering")
            if 100 <= _status(rhead) < 200:  # interim answers (100 without Expect, 103) pass through
                client.sendall(rhead)
                rhead = None
                continue
            return self._relay_response(client, urf, method, rhead, partial=partial)

    def _relay_response(self, client, urf, method, rhead, *, partial) -> bool:
        status = _status(rhead)
        _, rh = _parse_head(rhead)
        no_body = method == "HEAD" or status in (204, 304)
        if partial:
            # Client must never receive a complete answer: cut in the head if there is no body.
            n = int(rh.get("content-length", "0") or 0)
            if no_body or n < 2:
                client.sendall(rhead[: len(rhead) // 2])
            else:
                client.sendall(rhead)
                _copy_exact(urf, client, n // 2, self._stats, "down")
            _reset(client)
            raise _Abort("reset_after injected")
        client.sendall(rhead)
        if no_body:
            pass
        elif "chunked" in rh.get("transfer-encoding", "").lower():
            _copy_chunked(urf, client, self._stats, "down")
        elif "content-length" in rh:
            _copy_exact(urf, client, int(rh["content-length"]), self._stats, "down")
        else:  # body delimited by close
            while chunk := urf.read1(_BUF):
                client.sendall(chunk)
                self._stats.add_bytes("down", len(chunk))
            return False
        return "close" not in rh.get("connection", "").lower()


def _status(head: bytes) -> int:
    try:
        return int(head.split(b" ", 2)[1])
    except (IndexError, ValueError):
        raise _Abort(f"bad status line {head[:80]!r}") from None


def _is_closed(s: socket.socket) -> bool:
    """True if an idle upstream connection was closed by the server (readable with EOF)."""
    try:
        r, _, _ = select.select([s], [], [], 0)
        if not r:
            return False
        return s.recv(1, socket.MSG_PEEK) == b""
    except OSError:
        return True


# ----------------------------------------------------------------------------------------- CLI

def _csv(text: str) -> tuple[str, ...]:
    return tuple(t.strip() for t in text.split(",") if t.strip())


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="fault-injecting reverse proxy for S3 on loopback")
    p.add_argument("--upstream", required=True, help="http://127.0.0.1:PORT of the S3 server")
    p.add_argument("--port", type=int, default=0, help="listen port (0: pick a free one)")
    p.add_argument("--fraction", type=float, default=0.0)
    p.add_argument("--kinds", type=_csv, default=FAILING_KINDS, help=f"comma list of {KINDS}")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-faults", type=int)
    p.add_argument("--delay-s", type=float, default=0.5)
    p.add_argument("--methods", type=_csv)
    p.add_argument("--path-pattern")
    a = p.parse_args(list(argv) if argv is not None else None)
    cfg = FaultConfig(fraction=a.fraction, kinds=a.kinds, seed=a.seed, max_faults=a.max_faults,
                      delay_s=a.delay_s, methods=a.methods, path_pattern=a.path_pattern)
    proxy = FaultProxy(a.upstream, cfg, port=a.port).start()
    print(json.dumps({"endpoint_url": proxy.endpoint_url, "upstream": a.upstream,
                      "config": dataclasses.asdict(cfg)}), flush=True)
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    proxy.stop()
    print(json.dumps(proxy.stats()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
