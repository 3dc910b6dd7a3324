"""Small asyncio HTTP/1.1 helpers for the benchmark harness (standard library only).

- `prime`: GET every id of a list once over keep-alive connections (fills a cache
  the same way for every service, by reading).
- `stampede`: open N connections first, then send N GETs of one id back to back (about
  a millisecond for 200), split round-robin across one or more base URLs.

Loopback targets only: the harness never points these at anything else.
"""
from __future__ import annotations

import asyncio
import selectors
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit


@dataclass
class Reply:
    status: int
    headers: dict
    body: bytes
    latency_s: float = 0.0


def _target(base_url: str) -> tuple[str, int]:
    u = urlsplit(base_url)
    if u.scheme != "http" or u.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise ValueError(f"{base_url}: only http:// loopback targets are allowed")
    return u.hostname, u.port or 80


class Conn:
    """One keep-alive HTTP/1.1 connection."""

    def __init__(self, base_url: str, token: str | None = None):
        self.host, self.port = _target(base_url)
        self.token = token
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(self.host, self.port)

    def request_bytes(self, method: str, path: str, body: bytes = b"") -> bytes:
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}",
                 "User-Agent: kura-bench-harness"]
        if self.token:
            lines.append(f"Authorization: Bearer {self.token}")
        if body or method in ("PUT", "POST"):
            lines.append("Content-Type: application/json")
            lines.append(f"Content-Length: {len(body)}")
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + body

    async def send(self, raw: bytes) -> Reply:
        if self.writer is None:
            await self.connect()
        assert self.reader is not None and self.writer is not None
        t0 = time.perf_counter()
        self.writer.write(raw)
        await self.writer.drain()
        head = await self.reader.readuntil(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ", 2)[1])
        headers = {}
        for h in header_lines:
            if ":" in h:
                k, v = h.split(":", 1)
                headers[k.strip().lower()] = v.strip()
        if "content-length" in headers:
            body = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
                if size == 0:
                    await self.reader.readuntil(b"\r\n")
                    break
                chunks.append(await self.reader.readexactly(size))
                await self.reader.readexactly(2)
            body = b"".join(chunks)
        else:
            body = b""
        return Reply(status, headers, body, time.perf_counter() - t0)

    async def get(self, path: str) -> Reply:
        return await self.send(self.request_bytes("GET", path))

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            try:
                await self.writer.wait_closed()
            except (ConnectionError, OSError):
                pass


async def _prime(base_url, ids, token, concurrency, path_template):
    queue: asyncio.Queue[str] = asyncio.Queue()
    for i in ids:
        queue.put_nowait(i)
    statuses: dict[int, int] = {}
    x_cache: dict[str, int] = {}

    async def worker():
        c = Conn(base_url, token)
        try:
            while True:
                try:
                    uid = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                r = await c.get(path_template.format(id=uid))
                statuses[r.status] = statuses.get(r.status, 0) + 1
                xc = r.headers.get("x-cache", "none")
                x_cache[xc] = x_cache.get(xc, 0) + 1
        finally:
            await c.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return {"requests": len(ids), "seconds": time.perf_counter() - t0,
            "statuses": statuses, "x_cache": x_cache}


def prime(base_url: str, ids: list[str], token: str | None = None, concurrency: int = 32,
          path_template: str = "/api/v1/profiles/{id}") -> dict:
    """GETs every id once; returns counts of statuses and X-Cache values."""
    return asyncio.run(_prime(base_url, ids, token, concurrency, path_template))


@dataclass
class StampedeResult:
    n: int
    urls: list
    statuses: dict = field(default_factory=dict)
    x_cache: dict = field(default_factory=dict)
    errors: int = 0
    wall_s: float = 0.0
    max_latency_ms: float = 0.0
    p50_latency_ms: float = 0.0
    send_s: float = 0.0


def _parse_response(buf: bytes):
    """(status, headers, total length) of a complete response at the start of buf, else None."""
    head_end = buf.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = buf[:head_end].decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for h in lines[1:]:
        if ":" in h:
            k, v = h.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    if "content-length" in headers:
        total = head_end + 4 + int(headers["content-length"])
        return (status, headers, total) if len(buf) >= total else None
    if headers.get("transfer-encoding", "").lower() == "chunked":
        return (status, headers, len(buf)) if buf.endswith(b"0\r\n\r\n") else None
    return status, headers, head_end + 4


def stampede(urls: list[str], uid: str, n: int = 200, token: str | None = None,
             path_template: str = "/api/v1/profiles/{id}", timeout: float = 30.0) -> StampedeResult:
    """N simultaneous GETs of one id over N pre-opened connections, spread over `urls`.

    The connections are opened first; then the N requests are written back to back from one
    thread with plain blocking sends (about a millisecond for 200), and the answers are read
    as they come.
    """
    path = path_template.format(id=uid)
    socks, raws = [], []
    for i in range(n):
        base = urls[i % len(urls)]
        c = Conn(base, token)
        s = socket.create_connection((c.host, c.port), timeout=timeout)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks.append(s)
        raws.append(c.request_bytes("GET", path))
    res = StampedeResult(n=n, urls=list(urls))
    sel = selectors.DefaultSelector()
    bufs = {}
    sent_at = {}
    time.sleep(0.05)
    t0 = time.perf_counter()
    for s, raw in zip(socks, raws):
        s.sendall(raw)
        sent_at[s.fileno()] = time.perf_counter()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
        bufs[s.fileno()] = b""
    lat = []
    pending = len(socks)
    deadline = time.perf_counter() + timeout
    while pending and time.perf_counter() < deadline:
        for key, _ in sel.select(timeout=0.5):
            s = key.fileobj
            try:
                chunk = s.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                chunk = b""
            fd = s.fileno()
            if not chunk:
                res.errors += 1
                sel.unregister(s)
                pending -= 1
                continue
            bufs[fd] += chunk
            parsed = _parse_response(bufs[fd])
            if parsed:
                status, headers, _ = parsed
                lat.append(time.perf_counter() - sent_at[fd])
                res.statuses[status] = res.statuses.get(status, 0) + 1
                xc = headers.get("x-cache", "none")
                res.x_cache[xc] = res.x_cache.get(xc, 0) + 1
                sel.unregister(s)
                pending -= 1
    res.errors += pending
    res.wall_s = time.perf_counter() - t0
    res.send_s = max(sent_at.values()) - t0 if sent_at else 0.0
    for s in socks:
        s.close()
    sel.close()
    if lat:
        lat.sort()
        res.max_latency_ms = lat[-1] * 1000
        res.p50_latency_ms = lat[len(lat) // 2] * 1000
    return res


def request(base_url: str, method: str, path: str, token: str | None = None,
            body: bytes = b"") -> Reply:
    """One request on a fresh connection."""
    async def go():
        c = Conn(base_url, token)
        try:
            return await c.send(c.request_bytes(method, path, body))
        finally:
            await c.close()
    return asyncio.run(go())
