"""The Python publishers against a real sidecast server (the binary cargo built)."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from sidecast_publisher import AsyncPublisher, PublishError, Publisher

ROOT = Path(__file__).resolve().parents[2]
BIN = os.environ.get("SIDECAST_BIN", str(ROOT / "target" / "debug" / "sidecast"))
KEY = "python-test-publish-key-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``sidecast serve`` on a temp socket, an ephemeral WebSocket port and an HTTP port."""

    def __init__(
        self, socket_path: str | None = None, http_port: int | None = None, extra: tuple = ()
    ) -> None:
        self.socket = socket_path or os.path.join(tempfile.mkdtemp(), "sidecast.sock")
        self.http_port = http_port or free_port()
        self.url = f"http://127.0.0.1:{self.http_port}"
        env = {**os.environ, "SIDECAST_PUBLISH_KEY": KEY}
        env.pop("RUST_LOG", None)
        self.process = subprocess.Popen(
            [BIN, "serve", "--listen", "127.0.0.1:0", "--publish-socket", self.socket,
             "--publish-listen", f"127.0.0.1:{self.http_port}", "--dashboard", "off", *extra],
            env=env, stderr=subprocess.PIPE, text=True,
        )
        line = self.process.stderr.readline()
        while "ws://" not in line:
            line = self.process.stderr.readline()
        self.ws_addr = line.split("ws://")[1].split("/")[0]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)
        self.process.stderr.close()


class Subscriber:
    """A minimal WebSocket client: subscribes, then reads JSON messages."""

    def __init__(self, ws_addr: str, channel: str) -> None:
        host, port = ws_addr.split(":")
        self.sock = socket.create_connection((host, int(port)), timeout=10)
        self.sock.sendall(
            f"GET /ws HTTP/1.1\r\nHost: {ws_addr}\r\nUpgrade: websocket\r\n"
            "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
            "Sec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        self.buffer = b""
        while b"\r\n\r\n" not in self.buffer:
            self.buffer += self.sock.recv(4096)
        self.buffer = self.buffer.split(b"\r\n\r\n", 1)[1]
        assert self.next()["type"] == "connected"
        payload = json.dumps({"type": "subscribe", "channel": channel}).encode()
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)
        assert self.next()["type"] == "subscribed"

    def next(self) -> dict:
        while True:
            if len(self.buffer) >= 2:
                length, offset = self.buffer[1] & 0x7F, 2
                if length == 126 and len(self.buffer) >= 4:
                    length, offset = int.from_bytes(self.buffer[2:4], "big"), 4
                if length < 126 and len(self.buffer) >= offset + length:
                    opcode = self.buffer[0] & 0x0F
                    payload = self.buffer[offset : offset + length]
                    self.buffer = self.buffer[offset + length :]
                    if opcode == 1:
                        return json.loads(payload)
                    continue
            self.buffer += self.sock.recv(65536)

    def send(self, value: dict) -> None:
        payload = json.dumps(value).encode()
        mask = b"\x01\x02\x03\x04"
        masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
        self.sock.sendall(bytes([0x81, 0x80 | len(payload)]) + mask + masked)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture(scope="module")
def server():
    running = Server()
    yield running
    running.stop()


def test_publishes_over_the_socket_and_the_event_reaches_a_subscriber(server):
    watcher = Subscriber(server.ws_addr, "project:1")
    with Publisher(socket_path=server.socket) as sidecast:
        reply = sidecast.publish("project:1", {"type": "progress", "progress": 40})
    assert reply == {"id": 1, "ok": True, "seq": 1, "delivered": 1}
    assert watcher.next() == {
        "type": "event", "channel": "project:1", "seq": 1,
        "data": {"type": "progress", "progress": 40},
    }
    watcher.close()


def test_an_acknowledged_publish_returns_the_ack_report(server):
    silent = Subscriber(server.ws_addr, "order:acked")
    with Publisher(socket_path=server.socket) as sidecast:
        started = time.monotonic()
        report = sidecast.publish("order:acked", {"status": "paid"}, ack_timeout=0.3)
        assert time.monotonic() - started >= 0.3
    assert (report["type"], report["delivered"], report["acked"], report["timedOut"]) == (
        "ack_report", 1, 0, 1,
    )
    assert silent.next()["ack"] is True

    async def acked() -> dict:
        async with AsyncPublisher(socket_path=server.socket) as sidecast:
            reporting = asyncio.ensure_future(
                sidecast.publish("order:acked", {"status": "shipped"}, ack_timeout=5)
            )
            event = await asyncio.to_thread(silent.next)
            silent.send({"type": "ack", "channel": "order:acked", "seq": event["seq"]})
            return await reporting

    report = asyncio.run(acked())
    assert (report["seq"], report["delivered"], report["acked"]) == (2, 1, 1)
    over_http = Publisher(url=server.url, key=KEY).publish("order:acked", 3, ack_timeout=0.2)
    assert (over_http["type"], over_http["seq"], over_http["timedOut"]) == ("ack_report", 3, 1)
    silent.close()


def test_targets_fire_and_forget_and_idem(server):
    watcher = Subscriber(server.ws_addr, "user:u9")
    with Publisher(socket_path=server.socket) as sidecast:
        assert sidecast.publish_to_user("u9", "hi", fire_and_forget=True) == {"ok": True}
        assert watcher.next()["data"] == "hi"
        first = sidecast.publish("job:py", "done", idem="py-job-1")
        retry = sidecast.publish("job:py", "done", idem="py-job-1")
        assert (retry["seq"], retry.get("duplicate")) == (first["seq"], True)
        assert sidecast.broadcast({"all": True})["delivered"] >= 1
        assert sidecast.disconnect_user("nobody") == {"id": 4, "ok": True, "disconnected": 0}
    watcher.close()


def test_a_refused_command_is_a_publish_error_that_says_why(server):
    with Publisher(socket_path=server.socket) as sidecast:
        with pytest.raises(PublishError) as refused:
            sidecast.publish("bad name", 1)
        assert (refused.value.code, refused.value.retryable) == ("rejected", False)
        assert 'invalid channel "bad name"' in str(refused.value)
        assert sidecast.publish("still:fine", 1)["ok"] is True


def test_publishes_over_http_with_the_key(server):
    watcher = Subscriber(server.ws_addr, "project:http")
    reply = Publisher(url=server.url, key=KEY).publish("project:http", {"over": "http"})
    assert reply == {"id": None, "ok": True, "seq": 1, "delivered": 1}
    assert watcher.next()["data"] == {"over": "http"}
    with pytest.raises(PublishError) as refused:
        Publisher(url=server.url, key="wrong").publish("project:http", 1)
    assert refused.value.code == "unauthorized"
    with pytest.raises(PublishError) as rejected:
        Publisher(url=server.url, key=KEY).publish("bad name", 1)
    assert (rejected.value.code, rejected.value.status) == ("rejected", 400)
    watcher.close()


def test_async_publishes_in_flight_keep_their_order(server):
    async def main():
        async with AsyncPublisher(socket_path=server.socket, max_in_flight=50) as sidecast:
            replies = await asyncio.gather(
                *(sidecast.publish("order:py", {"n": n}) for n in range(1000))
            )
            assert [r["seq"] for r in replies] == list(range(1, 1001))
            with pytest.raises(PublishError) as refused:
                await sidecast.publish("bad name", 1)
            assert refused.value.code == "rejected"
            over_http = AsyncPublisher(url=server.url, key=KEY)
            assert (await over_http.publish("order:py", "http"))["seq"] == 1001

    asyncio.run(main())


def test_a_server_that_goes_away_and_comes_back():
    own = Server()
    sidecast = Publisher(socket_path=own.socket, timeout=0.5, reconnect_min=0.02)
    assert sidecast.publish("a:b", 1)["seq"] == 1
    own.stop()
    with pytest.raises(PublishError) as lost:
        sidecast.publish("a:b", 2)
    assert lost.value.code in ("disconnected", "unreachable") and lost.value.retryable
    back = Server(socket_path=own.socket, http_port=own.http_port)
    assert sidecast.publish("a:b", 3, timeout=5)["ok"] is True
    sidecast.close()
    with pytest.raises(PublishError) as closed:
        sidecast.publish("a:b", 4)
    assert closed.value.code == "closed"
    back.stop()


def test_options_are_checked():
    with pytest.raises(TypeError):
        Publisher()
    with pytest.raises(TypeError):
        AsyncPublisher(socket_path="a", url="http://b")


def test_a_publish_redis_could_not_store_is_a_retryable_error():
    redis_port = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(redis_port), "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    server = Server(extra=("--engine", "redis", "--redis-url", f"redis://127.0.0.1:{redis_port}"))
    try:
        with Publisher(socket_path=server.socket) as sidecast:
            for _ in range(100):  # until the node has connected to Redis
                try:
                    reply = sidecast.publish("job:redis", 1)
                    break
                except PublishError as e:
                    assert e.code == "unavailable"
                    time.sleep(0.05)
            assert (reply["seq"], reply["nodes"]) == (1, 0)
            redis.kill()
            redis.wait()
            with pytest.raises(PublishError) as down:
                sidecast.publish("job:redis", 2)
            assert (down.value.code, down.value.retryable) == ("unavailable", True)
            assert down.value.reply["error"] == "unavailable"
    finally:
        server.stop()
        redis.kill()
        redis.wait()
