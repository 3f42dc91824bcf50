"""Publish events to sidecast from Python workers: standard library only, Python 3.9+.

    from sidecast_publisher import Publisher

    with Publisher(socket_path="/run/sidecast/sidecast.sock") as sidecast:
        sidecast.publish("project:42", {"type": "progress", "progress": 40})

Over the Unix socket it speaks the NDJSON publish protocol (docs/protocol.md, "Publish
port"): each confirmed publish carries an id and waits for its reply. Over HTTP (``url``, the
server's ``publish_listen``) each publish is one POST /publish. ``AsyncPublisher`` is the same
for asyncio, with many publishes in flight on one connection.

Errors are ``PublishError`` with a ``code`` and ``retryable``; pass ``idem`` to make a retry
safe (the server answers it with the first result instead of publishing twice). Pass
``ack_timeout`` (seconds) to have the pages acknowledge the event: the publish
then returns the server's ``ack_report`` (``delivered``, ``acked``, ``timedOut``,
``disconnected``, ``lost``, ``nodes``, ``nodesLost``) instead of the plain reply.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import socket
import time
import urllib.error
import urllib.request
from typing import Any, Dict, Optional

__all__ = ["AsyncPublisher", "PublishError", "Publisher"]

Reply = Dict[str, Any]


class PublishError(Exception):
    """Why a publish failed.

    ``code`` is one of ``rejected`` (the server refused the command; ``reply["error"]`` says
    why), ``disconnected`` (the connection closed before the reply), ``timeout``,
    ``unreachable`` (cannot connect), ``unauthorized`` (the HTTP listener refused the key),
    ``unavailable`` (HTTP 5xx, or a reply with ``retry: true``: Redis could not store it) or
    ``closed``. ``retryable`` tells whether the same publish may
    succeed if tried again.
    """

    def __init__(
        self,
        message: str,
        code: str,
        retryable: bool,
        reply: Optional[Reply] = None,
        status: Optional[int] = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.retryable = retryable
        self.reply = reply
        self.status = status


def _command(target: Dict[str, Any], data: Any, idem: Optional[str]) -> Dict[str, Any]:
    command = dict(target)
    if data is not _NO_DATA:
        command["data"] = data
    if idem is not None:
        command["idem"] = idem
    return command


_NO_DATA = object()


def _check(reply: Reply) -> Reply:
    if not reply.get("ok"):
        # ``retry: true``: the engine could not store it (Redis unreachable); try again.
        if reply.get("retry") is True:
            raise PublishError(str(reply.get("error")), "unavailable", True, reply=reply)
        raise PublishError(str(reply.get("error")), "rejected", False, reply=reply)
    return reply


def _backoff(failures: int, low: float, high: float) -> float:
    return min(high, low * 2 ** (failures - 1)) * (0.5 + random.random() / 2)


def _post(url: str, key: Optional[str], command: Dict[str, Any], timeout: float) -> Reply:
    """One POST /publish; the same errors as the socket."""
    headers = {"Content-Type": "application/json"}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    request = urllib.request.Request(
        url.rstrip("/") + "/publish",
        data=json.dumps(command).encode(),
        headers=headers,
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            # An acknowledged publish is answered with its reply, then its ack_report.
            lines = [json.loads(line) for line in response.read().splitlines() if line.strip()]
            reply = _check(lines[0])
            return lines[-1] if "ack" in command else reply
    except urllib.error.HTTPError as error:
        body = error.read()
        try:
            reply = json.loads(body)
        except ValueError:
            reply = None
        message = (reply or {}).get("error") or f"HTTP {error.code}"
        if error.code == 401:
            raise PublishError(message, "unauthorized", False, status=401) from None
        if error.code >= 500:
            raise PublishError(message, "unavailable", True, status=error.code) from None
        raise PublishError(message, "rejected", False, reply=reply, status=error.code) from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        code = "timeout" if isinstance(reason, TimeoutError) else "unreachable"
        raise PublishError(f"cannot reach {url}: {reason}", code, True) from None


class _Base:
    """What both publishers share: where to publish, and the publish calls over ``send``."""

    def __init__(
        self,
        socket_path: Optional[str],
        url: Optional[str],
        key: Optional[str],
        timeout: float,
        reconnect_min: float,
        reconnect_max: float,
    ) -> None:
        if (socket_path is None) == (url is None):
            raise TypeError("give exactly one of socket_path or url")
        self._path = socket_path
        self._url = url
        self._key = key
        self._timeout = timeout
        self._backoff = (reconnect_min, reconnect_max)
        self._ids = itertools.count(1)
        self._failures = 0
        self._closed = False

    def _prepare(
        self,
        target: Dict[str, Any],
        data: Any,
        idem: Optional[str],
        timeout: Optional[float],
        ack_timeout: Optional[float] = None,
        fire_and_forget: bool = False,
    ) -> tuple:
        """The command and its timeout; refuses once closed."""
        if self._closed:
            raise PublishError("the publisher is closed", "closed", False)
        command = _command(target, data, idem)
        timeout = self._timeout if timeout is None else timeout
        if ack_timeout is not None:
            if fire_and_forget:
                raise TypeError("ack_timeout needs a reply (not fire_and_forget)")
            command["ack"] = {"timeout": f"{round(ack_timeout * 1000)}ms"}
            if self._url is not None:
                command = {"id": next(self._ids), **command}  # the report carries it
                timeout += ack_timeout  # the response waits for the report
        return command, timeout

    def publish(self, channel: str, data: Any, **options: Any):
        """Publishes ``data`` to ``channel``; returns the reply (``seq``, ``delivered`` or ``nodes``, ...)."""
        return self.send({"channel": channel}, data, **options)

    def publish_to_user(self, user: str, data: Any, **options: Any):
        """Publishes to every connection of ``user`` (the channel ``user:<user>``)."""
        return self.send({"user": user}, data, **options)

    def broadcast(self, data: Any, **options: Any):
        """Publishes to every open WebSocket."""
        return self.send({"broadcast": True}, data, **options)

    def disconnect_user(self, user: str, **options: Any):
        """Closes every connection of ``user`` (close code 4003)."""
        return self.send({"op": "disconnect", "user": user}, _NO_DATA, **options)


class Publisher(_Base):
    """A blocking publisher: one publish at a time on one connection.

    Give ``socket_path`` (NDJSON over the Unix socket) or ``url`` (HTTP, with ``key``).
    A broken connection is reopened on the next publish, with backoff, within ``timeout``.
    """

    def __init__(
        self,
        socket_path: Optional[str] = None,
        url: Optional[str] = None,
        key: Optional[str] = None,
        timeout: float = 10.0,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
    ) -> None:
        super().__init__(socket_path, url, key, timeout, reconnect_min, reconnect_max)
        self._sock: Optional[socket.socket] = None
        self._input = b""

    def __enter__(self) -> "Publisher":
        return self

    def __exit__(self, *_exc: Any) -> None:
        self.close()

    def send(
        self,
        target: Dict[str, Any],
        data: Any = _NO_DATA,
        *,
        idem: Optional[str] = None,
        fire_and_forget: bool = False,
        timeout: Optional[float] = None,
        ack_timeout: Optional[float] = None,
    ) -> Reply:
        """Sends one command; with ``fire_and_forget`` (socket only) returns once written;
        with ``ack_timeout``, returns the ack report that follows the reply."""
        command, timeout = self._prepare(target, data, idem, timeout, ack_timeout, fire_and_forget)
        if self._url is not None:
            return _post(self._url, self._key, command, timeout)
        deadline = time.monotonic() + timeout
        if fire_and_forget:
            self._write(command, deadline)
            return {"ok": True}
        command = {"id": next(self._ids), **command}
        self._write(command, deadline)
        reply = _check(self._reply(command["id"], deadline))
        if ack_timeout is None:
            return reply
        return self._reply(command["id"], time.monotonic() + ack_timeout + timeout)

    def close(self) -> None:
        """Closes the connection; later publishes raise ``closed``."""
        self._closed = True
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def _connection(self, deadline: float) -> socket.socket:
        while self._sock is None:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                sock.connect(self._path)
                self._sock, self._input, self._failures = sock, b"", 0
            except OSError as error:
                sock.close()
                self._failures += 1
                delay = _backoff(self._failures, *self._backoff)
                if time.monotonic() + delay > deadline:
                    raise PublishError(
                        f"cannot connect to {self._path}: {error}", "unreachable", True
                    ) from None
                time.sleep(delay)
        return self._sock

    def _write(self, command: Dict[str, Any], deadline: float) -> None:
        sock = self._connection(deadline)
        try:
            sock.settimeout(max(0.001, deadline - time.monotonic()))
            sock.sendall(json.dumps(command).encode() + b"\n")
        except OSError as error:
            self._drop()
            raise self._lost(error) from None

    def _reply(self, id_: int, deadline: float) -> Reply:
        sock = self._sock
        assert sock is not None
        while True:
            newline = self._input.find(b"\n")
            if newline >= 0:
                line, self._input = self._input[:newline], self._input[newline + 1 :]
                reply = json.loads(line)
                if reply.get("id") == id_:
                    return reply
                continue
            try:
                sock.settimeout(max(0.001, deadline - time.monotonic()))
                chunk = sock.recv(65536)
            except socket.timeout:
                self._drop()  # its reply could still arrive and be taken for another's
                raise PublishError("no reply in time", "timeout", True) from None
            except OSError as error:
                self._drop()
                raise self._lost(error) from None
            if not chunk:
                self._drop()
                raise self._lost("the server closed the connection")
            self._input += chunk

    def _drop(self) -> None:
        if self._sock is not None:
            self._sock.close()
        self._sock = None

    @staticmethod
    def _lost(why: Any) -> PublishError:
        return PublishError(f"the connection closed before the reply: {why}", "disconnected", True)


class AsyncPublisher(_Base):
    """The asyncio publisher: many publishes in flight on one connection.

    Writes wait for the socket to drain, and at most ``max_in_flight`` publishes await their
    reply at once, so memory stays bounded whatever the caller does.
    """

    def __init__(
        self,
        socket_path: Optional[str] = None,
        url: Optional[str] = None,
        key: Optional[str] = None,
        timeout: float = 10.0,
        max_in_flight: int = 1000,
        reconnect_min: float = 0.1,
        reconnect_max: float = 5.0,
    ) -> None:
        super().__init__(socket_path, url, key, timeout, reconnect_min, reconnect_max)
        self._slots = asyncio.Semaphore(max_in_flight)
        self._lock = asyncio.Lock()
        self._writer: Optional[asyncio.StreamWriter] = None
        self._reader_task: Optional[asyncio.Task] = None
        self._waiting: Dict[int, asyncio.Future] = {}
        self._reports: Dict[int, asyncio.Future] = {}

    async def __aenter__(self) -> "AsyncPublisher":
        return self

    async def __aexit__(self, *_exc: Any) -> None:
        await self.close()

    async def send(
        self,
        target: Dict[str, Any],
        data: Any = _NO_DATA,
        *,
        idem: Optional[str] = None,
        fire_and_forget: bool = False,
        timeout: Optional[float] = None,
        ack_timeout: Optional[float] = None,
    ) -> Reply:
        """Sends one command; with ``fire_and_forget`` (socket only) returns once written;
        with ``ack_timeout``, returns the ack report that follows the reply."""
        command, timeout = self._prepare(target, data, idem, timeout, ack_timeout, fire_and_forget)
        if self._url is not None:
            return await asyncio.to_thread(_post, self._url, self._key, command, timeout)
        deadline = time.monotonic() + timeout
        if fire_and_forget:
            await self._write(command, deadline)
            return {"ok": True}
        async with self._slots:
            id_ = next(self._ids)
            loop = asyncio.get_running_loop()
            future = loop.create_future()
            self._waiting[id_] = future
            if ack_timeout is not None:
                self._reports[id_] = loop.create_future()
            try:
                await self._write({"id": id_, **command}, deadline)
                left = max(0.001, deadline - time.monotonic())
                reply = _check(await asyncio.wait_for(asyncio.shield(future), left))
                if ack_timeout is not None:
                    report = self._reports[id_]
                    reply = await asyncio.wait_for(asyncio.shield(report), ack_timeout + timeout)
            except asyncio.TimeoutError:
                raise PublishError("no reply in time", "timeout", True) from None
            finally:
                self._waiting.pop(id_, None)
                self._reports.pop(id_, None)
        return reply

    async def close(self) -> None:
        """Waits for the replies in flight, then closes; later publishes raise ``closed``."""
        self._closed = True
        if self._waiting:
            await asyncio.gather(*self._waiting.values(), return_exceptions=True)
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()

    async def _write(self, command: Dict[str, Any], deadline: float) -> None:
        async with self._lock:  # lines leave in call order
            writer = await self._connection(deadline)
            try:
                writer.write(json.dumps(command).encode() + b"\n")
                await writer.drain()
            except OSError as error:
                self._lost(error)
                raise PublishError(f"write failed: {error}", "disconnected", True) from None

    async def _connection(self, deadline: float) -> asyncio.StreamWriter:
        while self._writer is None:
            try:
                reader, writer = await asyncio.open_unix_connection(self._path)
                self._writer, self._failures = writer, 0
                self._reader_task = asyncio.create_task(self._read(reader, writer))
            except OSError as error:
                self._failures += 1
                delay = _backoff(self._failures, *self._backoff)
                if time.monotonic() + delay > deadline:
                    raise PublishError(
                        f"cannot connect to {self._path}: {error}", "unreachable", True
                    ) from None
                await asyncio.sleep(delay)
        return self._writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                reply = json.loads(line)
                waiting = self._reports if reply.get("type") == "ack_report" else self._waiting
                future = waiting.get(reply.get("id"))
                if future is not None and not future.done():
                    future.set_result(reply)
        except (OSError, ValueError) as error:
            self._lost(error)
            return
        if self._writer is writer:
            self._lost("the server closed the connection")

    def _lost(self, why: Any) -> None:
        self._writer = None
        for future in [*self._waiting.values(), *self._reports.values()]:
            if not future.done():
                future.set_exception(
                    PublishError(f"the connection closed before the reply: {why}", "disconnected", True)
                )
