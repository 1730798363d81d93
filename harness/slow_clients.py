"""Slow clients in the style of slowloris: connections that trickle a request and never finish it.

    .venv/bin/python -m harness.slow_clients http://127.0.0.1:8080 --headers 1000 --bodies 200 \
        --probe http://127.0.0.1:8081/healthz

Two kinds, each from its own loopback source addresses (127.0.x.y, so that a per-address cap
counts them as many clients):

- header tricklers send a request line, then one header field every `interval_s`, and never the
  blank line that ends the header;
- body tricklers send a whole header declaring a `body_bytes` body (POST /moderate, whose cap
  takes images of megabytes), then a few bytes of it every `interval_s`, never all of it.

Each connection the server closes is opened again while the run lasts, so the number held stays
where it was asked. `stop()` ends the trickling but keeps every socket open, and waits until the
server has closed each one: `Connection` records when each was opened, when it last sent and
when the server closed it, the evidence that the server's timeouts hold.

Everything runs on one asyncio loop in a thread of its own; raise the open-file limit first
(`raise_open_files`). tests/embedded/test_front_door.py and `harness.load --slow-headers` use it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import resource
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from typing_extensions import Self

Kind = Literal["header", "body"]


@dataclass
class Connection:
    """One slow connection; times are time.monotonic()."""

    kind: Kind
    source: str
    opened: float
    last_sent: float
    closed: float | None = None
    by_server: bool = False
    answer: bytes = b""  # whatever the server sent before it closed

    @property
    def quiet_s(self) -> float | None:
        """From the last byte sent to the server's close."""
        return None if self.closed is None else self.closed - self.last_sent

    @property
    def held_s(self) -> float | None:
        """From connecting to the server's close."""
        return None if self.closed is None else self.closed - self.opened


def sources(count: int, *, third_octet: int) -> list[str]:
    """`count` loopback addresses 127.0.<third_octet>.1, .2, ... (Linux routes all of 127/8)."""
    if not 1 <= count <= 254:
        raise ValueError("between 1 and 254 source addresses")
    return [f"127.0.{third_octet}.{host}" for host in range(1, count + 1)]


def raise_open_files(needed: int) -> None:
    """Raise this process's soft open-file limit to `needed` (within the hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise RuntimeError(f"{needed} open files needed; the hard limit is {hard} (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@dataclass
class SlowClients:
    """`headers` header tricklers and `bodies` body tricklers against `url` (http://host:port)."""

    url: str
    headers: int
    bodies: int
    header_sources: list[str] = field(default_factory=lambda: sources(100, third_octet=201))
    body_sources: list[str] = field(default_factory=lambda: sources(100, third_octet=202))
    interval_s: float = 1.0
    body_bytes: int = 100_000
    connections: list[Connection] = field(default_factory=list)

    def __post_init__(self) -> None:
        parsed = urllib.parse.urlsplit(self.url)
        self.host, self.port = parsed.hostname or "127.0.0.1", parsed.port or 80
        self._trickling = threading.Event()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._tasks: list[asyncio.Task[None]] = []
        self._open: Counter[Kind] = Counter()
        self.peak: Counter[Kind] = Counter()
        self.failed_connects = 0

    def start(self) -> Self:
        self._trickling.set()
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start_all(), self._loop).result(timeout=60)
        return self

    async def _start_all(self) -> None:
        for number in range(self.headers):
            source = self.header_sources[number % len(self.header_sources)]
            self._tasks.append(asyncio.create_task(self._keep("header", source, number)))
        for number in range(self.bodies):
            source = self.body_sources[number % len(self.body_sources)]
            self._tasks.append(asyncio.create_task(self._keep("body", source, number)))

    def open_now(self) -> Counter[Kind]:
        return Counter(self._open)

    async def _keep(self, kind: Kind, source: str, number: int) -> None:
        """One slot: a slow connection, opened again each time the server closes it."""
        while self._trickling.is_set():
            try:
                reader, writer = await asyncio.open_connection(
                    self.host, self.port, local_addr=(source, 0)
                )
            except OSError:
                self.failed_connects += 1
                await asyncio.sleep(self.interval_s)
                continue
            now = time.monotonic()
            record = Connection(kind, source, opened=now, last_sent=now)
            self.connections.append(record)
            self._open[kind] += 1
            self.peak[kind] = max(self.peak[kind], self._open[kind])
            try:
                await self._trickle(record, number, reader, writer)
            finally:
                self._open[kind] -= 1
                writer.close()

    async def _trickle(
        self, record: Connection, number: int, reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        if record.kind == "header":
            first = f"GET /healthz HTTP/1.1\r\nHost: {self.host}\r\n".encode()
        else:
            first = (
                f"POST /moderate HTTP/1.1\r\nHost: {self.host}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {self.body_bytes}\r\n\r\n"
                '{"image": "'
            ).encode()
        closed = asyncio.ensure_future(reader.read(65536))
        sent = 0
        try:
            writer.write(first)
            await writer.drain()
            record.last_sent = time.monotonic()
            while True:
                wait = self.interval_s if self._trickling.is_set() else None
                done, _ = await asyncio.wait({closed}, timeout=wait)
                if done:
                    break
                if not self._trickling.is_set():
                    continue
                chunk = f"X-Slow-{number}-{sent}: 1\r\n".encode() if record.kind == "header" else b"a" * 10
                sent += 1
                writer.write(chunk)
                await writer.drain()
                record.last_sent = time.monotonic()
        except OSError:
            pass  # a write into a socket the server has reset: the read below says how it ended
        try:
            record.answer = await closed
        except OSError:
            record.answer = b""
        record.closed = time.monotonic()
        # EOF or a reset, without the client having closed: the server ended it.
        record.by_server = True

    def stop(self, timeout_s: float) -> list[Connection]:
        """Stop trickling, keep every socket open, and wait up to `timeout_s` for the server
        to close them all; returns every connection of the run."""
        self._trickling.clear()
        deadline = time.monotonic() + timeout_s
        while sum(self._open.values()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for task in self._tasks:
            self._loop.call_soon_threadsafe(task.cancel)
        time.sleep(0.2)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()
        return list(self.connections)


def summary(connections: list[Connection]) -> list[str]:
    lines = []
    for kind in ("header", "body"):
        mine = [c for c in connections if c.kind == kind]
        if not mine:
            continue
        open_left = sum(1 for c in mine if c.closed is None)
        held = [c.held_s for c in mine if c.held_s is not None]
        quiet = [c.quiet_s for c in mine if c.quiet_s is not None]
        answered = Counter(c.answer.split(b"\r\n", 1)[0].decode(errors="replace") for c in mine)
        lines.append(
            f"{kind} tricklers: {len(mine)} connections, {open_left} left open; held "
            f"{max(held, default=0):.1f}s at most; closed {max(quiet, default=0):.1f}s after "
            f"their last byte at most; first answer lines: {dict(answered)}"
        )
    return lines


def probe(url: str, timeout_s: float) -> float | None:
    """Seconds a GET took to answer 200, or None when it did not within `timeout_s`."""
    started = time.monotonic()
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            resp.read()
            return time.monotonic() - started if resp.status == 200 else None
    except OSError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url", help="http://host:port")
    parser.add_argument("--headers", type=int, default=1000)
    parser.add_argument("--bodies", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--probe", help="a URL to GET every second meanwhile (its latency)")
    parser.add_argument("--probe-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    raise_open_files(args.headers + args.bodies + 256)
    clients = SlowClients(args.url, args.headers, args.bodies, interval_s=args.interval).start()
    latencies: list[float | None] = []
    until = time.monotonic() + args.seconds
    while time.monotonic() < until:
        asked = time.monotonic()
        if args.probe:
            latencies.append(probe(args.probe, args.probe_timeout))
        time.sleep(max(0.0, 1.0 - (time.monotonic() - asked)))
    print(f"peak open: {dict(clients.peak)}, failed connects: {clients.failed_connects}")
    if args.probe:
        answered = sorted(x for x in latencies if x is not None)
        print(
            f"probe {args.probe}: {len(answered)} of {len(latencies)} answered within "
            f"{args.probe_timeout:.0f}s; median {answered[len(answered) // 2] * 1000:.1f} ms, "
            f"max {answered[-1] * 1000:.1f} ms" if answered else f"probe {args.probe}: "
            f"none of {len(latencies)} answered within {args.probe_timeout:.0f}s"
        )
    print("\n".join(summary(clients.stop(timeout_s=120))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
