"""The synchronous QMP session (qmp_bridge.client.QMPSession) against a scripted QMP server
on a socketpair: command timeouts, bounded event queues, a lost connection, attach errors.
No QEMU (the same session against a real QEMU: tests/live/test_qmp_client.py)."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from qmp_bridge.client import QMPSession
from qmp_bridge.errors import QMPConnectionError, QMPTimeoutError


class FakeQMP(threading.Thread):
    """A scripted QMP server on one end of a socketpair: greets, answers qmp_capabilities and
    "ping", never answers "hang", and answers "emit" after sending data.n events."""

    def __init__(self, sock: socket.socket):
        super().__init__(daemon=True)
        self.sock = sock

    def send(self, obj: dict) -> None:
        self.sock.sendall(json.dumps(obj).encode() + b"\r\n")

    def run(self) -> None:
        self.send({"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7},
                                       "package": ""}, "capabilities": []}})
        dec = json.JSONDecoder()
        buf = ""
        while True:
            try:
                chunk = self.sock.recv(65536)
            except OSError:
                return
            if not chunk:
                return
            buf += chunk.decode()
            while buf.strip():
                try:
                    msg, end = dec.raw_decode(buf.lstrip())
                except ValueError:
                    break
                buf = buf.lstrip()[end:]
                cmd = msg.get("execute")
                if cmd == "hang":
                    continue
                if cmd == "close":
                    self.sock.close()
                    return
                if cmd == "emit":
                    for i in range(msg["arguments"]["n"]):
                        self.send({"event": "E", "data": {"n": i},
                                   "timestamp": {"seconds": 0, "microseconds": 0}})
                self.send({"return": {}, "id": msg.get("id")})


@pytest.fixture
def fake():
    ours, theirs = socket.socketpair()
    server = FakeQMP(theirs)
    server.start()
    session = QMPSession(timeout=5.0, event_buffer=32)
    session.connect(ours, timeout=5.0)
    yield session
    session.close()
    theirs.close()


def test_command_timeout_leaves_session_usable(fake):
    t = time.monotonic()
    with pytest.raises(QMPTimeoutError, match="hang"):
        fake.execute("hang", timeout=0.3)
    assert time.monotonic() - t < 2.0
    assert fake.execute("ping") == {}


def test_event_queues_are_bounded(fake):
    with fake.listen("E", maxsize=8) as stream:
        fake.execute("emit", {"n": 500})
        evs = stream.drain()
        assert [e["data"]["n"] for e in evs] == list(range(492, 500))  # the newest kept
        assert stream.dropped == 492
        assert stream.get(timeout=0.05) is None
    recent = fake.recent_events()
    assert len(recent) == 32 and recent[-1]["data"]["n"] == 499
    # qemu.qmp's own default listener queues nothing and keeps no history
    assert fake._qmp.events.empty() and fake._qmp.events.history == ()
    assert fake.listener_count == 0


def test_lost_connection(fake):
    with fake.listen("E") as stream:
        with pytest.raises((QMPConnectionError, QMPTimeoutError)):
            fake.execute("close", timeout=2.0)
        with pytest.raises(QMPConnectionError):
            stream.get(timeout=2.0)
        with pytest.raises(QMPConnectionError):
            fake.execute("ping")
    assert not fake.connected


def test_attach_errors():
    with pytest.raises(QMPConnectionError, match="No such file"):
        QMPSession.attach("/nonexistent/qmp.sock", connect_timeout=1)
