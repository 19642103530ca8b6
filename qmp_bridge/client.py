"""A synchronous QMP session over qemu.qmp's asyncio QMPClient.

    with QMPSession.attach("/run/vm1/qmp.sock") as qmp:
        qmp.execute("query-status")                       # -> {"status": "running", ...}
        with qmp.listen(("JOB_STATUS_CHANGE",), match=lambda e: e["data"]["id"] == "j1") as ev:
            qmp.execute("block-commit", {"job-id": "j1", "device": "top"})
            ev.get(timeout=5)                             # events that arrived before the reply too

Design:
- qemu.qmp is asyncio and our callers are synchronous: each session runs its own event loop on a
  private daemon thread; every public call hands a coroutine to that loop and waits for it.
- Every command has a timeout (the session default, or per call); a wait for an event too.  A
  timeout raises QMPTimeoutError, a lost connection QMPConnectionError, an error reply
  QMPCommandError (QMPImageInUseError for lock conflicts).
- Events: listeners are registered *before* the command that triggers them (QEMU often sends a
  job's first events before the command's reply).  Every queue is bounded: a listener keeps at
  most `maxsize` events and drops the oldest (counting them) rather than growing; it keeps no
  history.  qemu.qmp's default all-events listener (which cannot be removed and would queue
  every event forever) is switched to accept nothing; a bounded ring of recent events replaces it.
"""
from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any, Callable, Coroutine, Iterable, Mapping

from qemu.qmp import ConnectError, EventListener, ExecuteError, QMPClient
from qemu.qmp import QMPError as _LibQMPError
from qemu.qmp.protocol import Runstate

from .errors import QMPConnectionError, QMPError, QMPTimeoutError, command_error

__all__ = ["QMPSession", "EventStream", "BoundedListener", "DEFAULT_TIMEOUT"]

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
_SLICE = 0.25  # how often a long wait re-checks that the connection is still up

Event = dict
EventMatch = Callable[[Event], bool]


def _as_dict(msg: Any) -> Event:
    """A qemu.qmp Message (or dict) as a plain dict."""
    return dict(msg)


class BoundedListener(EventListener):
    """An EventListener whose queue holds at most `maxsize` events (the oldest are dropped and
    counted in `dropped`) and which keeps no history."""

    def __init__(self, names: Iterable[str] | str | None = None,
                 match: EventMatch | None = None, maxsize: int = 256):
        super().__init__(names, None)
        self._match = match
        self._queue = asyncio.Queue(maxsize)
        self.dropped = 0

    def accept(self, event: Any) -> bool:
        if self.names and event.get("event") not in self.names:
            return False
        if self._match is None:
            return True
        try:
            return bool(self._match(_as_dict(event)))
        except Exception:  # a bad filter must not break qemu.qmp's reader task
            log.exception("event filter failed")
            return False

    async def put(self, event: Any) -> None:
        if not self.accept(event):
            return
        if self._queue.full():
            try:
                self._queue.get_nowait()
                self.dropped += 1
            except asyncio.QueueEmpty:
                pass
        self._queue.put_nowait(event)


class EventStream:
    """The synchronous side of a BoundedListener registered on a session.  Use as a context
    manager (or call close()) so that the listener is unregistered."""

    def __init__(self, session: "QMPSession", listener: BoundedListener):
        self._session = session
        self._listener = listener
        self._closed = False

    @property
    def dropped(self) -> int:
        """How many events were dropped because the queue was full."""
        return self._listener.dropped

    def get(self, timeout: float | None = None) -> Event | None:
        """The next event, waiting up to `timeout` seconds (None: the session timeout);
        None if nothing came.  Raises QMPConnectionError if the connection is lost."""
        limit = self._session.timeout if timeout is None else timeout
        return self._session._run(self._aget(limit), None, "event wait")

    async def _aget(self, limit: float) -> Event | None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, limit)
        lst = self._listener
        while True:
            if not lst.empty():
                return _as_dict(lst._queue.get_nowait())
            if not self._session._is_up():
                raise QMPConnectionError("QMP connection lost")
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                return _as_dict(await asyncio.wait_for(lst.get(), min(_SLICE, remaining)))
            except asyncio.TimeoutError:
                continue

    def drain(self) -> list[Event]:
        """Every event queued now (without waiting)."""
        async def take() -> list[Event]:
            return [_as_dict(e) for e in self._listener.clear()]
        return self._session._run(take(), 5.0, "event drain")

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._session._unregister(self._listener)

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class QMPSession:
    """One QMP connection, used synchronously from any thread."""

    def __init__(self, *, name: str = "qcow2engine", timeout: float = DEFAULT_TIMEOUT,
                 event_buffer: int = 256):
        """timeout: default seconds for every command; event_buffer: how many recent events
        (of any kind) are kept for recent_events()."""
        self.name = name
        self.timeout = timeout
        self._event_buffer = event_buffer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._qmp: QMPClient | None = None
        self._recent: BoundedListener | None = None
        self._listeners: set[BoundedListener] = set()   # touched on the loop thread only
        self._closed = False
        self.address: str | None = None

    # ------------------------------------------------------------------ connecting
    @classmethod
    def attach(cls, address: str | socket.socket, *, timeout: float = DEFAULT_TIMEOUT,
               connect_timeout: float | None = None, name: str = "qcow2engine") -> "QMPSession":
        """Connect to a QMP unix socket (a path, or a connected socket object)."""
        session = cls(name=name, timeout=timeout)
        session.connect(address, timeout=connect_timeout)
        return session

    def connect(self, address: str | socket.socket, *, timeout: float | None = None) -> None:
        """Connect and negotiate capabilities.  QEMU serves one client per monitor: while
        another client is connected no greeting comes, and this fails after `timeout`."""
        if self._qmp is not None:
            raise QMPError("session already connected")
        self._start_loop()
        limit = min(self.timeout, 10.0) if timeout is None else timeout
        self.address = address if isinstance(address, str) else "<socket>"

        async def go() -> None:
            qmp = QMPClient(self.name)
            # The default listener queues every event forever and cannot be removed: make it
            # accept nothing, and keep a bounded ring of recent events instead.
            qmp.events.event_filter = lambda _e: False
            self._recent = BoundedListener(maxsize=self._event_buffer)
            qmp.register_listener(self._recent)
            self._qmp = qmp
            try:
                await qmp.connect(address)
            except ConnectError as e:
                cause = getattr(e, "exc", None)
                why = getattr(cause, "strerror", None) or str(cause or e)
                raise QMPConnectionError("cannot connect to QMP at %s: %s"
                                         % (self.address, why)) from None

        try:
            self._run(go(), limit, "connect")
        except QMPTimeoutError:
            self._abandon()
            raise QMPConnectionError(
                "no QMP greeting from %s within %.1f s (is another client connected?)"
                % (self.address, limit)) from None
        except QMPConnectionError:
            self._abandon()
            raise
        except QMPError as e:
            self._abandon()
            raise QMPConnectionError("cannot connect to QMP at %s: %s" % (self.address, e)) from None

    def _abandon(self) -> None:
        self._qmp = None
        self._stop_loop()

    def close(self) -> None:
        """Disconnect and stop the session's thread.  Idempotent, never raises."""
        if self._closed:
            return
        self._closed = True
        if self._qmp is not None and self._loop is not None and self._thread is not None \
                and self._thread.is_alive():
            try:
                self._run(self._qmp.disconnect(), 3.0, "disconnect")
            except Exception:  # EOFError after 'quit' and similar races are normal
                pass
        self._stop_loop()

    def __enter__(self) -> "QMPSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def connected(self) -> bool:
        """True while the QMP session is up."""
        return self._is_up()

    def _is_up(self) -> bool:
        return self._qmp is not None and not self._closed and self._qmp.runstate == Runstate.RUNNING

    @property
    def greeting(self) -> dict:
        """QEMU's greeting (version, capabilities) as a dict."""
        if self._qmp is None or self._qmp.greeting is None:
            return {}
        return self._qmp.greeting._asdict()

    # ------------------------------------------------------------------ the loop thread
    def _start_loop(self) -> None:
        if self._loop is not None:
            return
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever,
                                        name="qmp-%s" % self.name, daemon=True)
        self._thread.start()

    def _stop_loop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)
        if thread is None or not thread.is_alive():
            loop.close()
        self._loop = None
        self._thread = None

    def _run(self, coro: Coroutine[Any, Any, Any], timeout: float | None, what: str) -> Any:
        """Run `coro` on the session's loop and wait for it (at most `timeout` s)."""
        loop = self._loop
        if loop is None or self._thread is None or not self._thread.is_alive():
            coro.close()
            raise QMPConnectionError("QMP session is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("QMPSession called from its own event-loop thread")

        async def bounded() -> Any:
            if timeout is None:
                return await coro
            return await asyncio.wait_for(coro, timeout)
        fut = asyncio.run_coroutine_threadsafe(bounded(), loop)
        try:
            return fut.result(None if timeout is None else timeout + 5.0)
        except (asyncio.TimeoutError, TimeoutError):
            fut.cancel()
            raise QMPTimeoutError("QMP %s: no answer within %.1f s" % (what, timeout)) from None
        except ExecuteError as e:
            raise command_error(what, str(e), e.error_class) from None
        except QMPError:
            raise
        except (_LibQMPError, EOFError, ConnectionError, OSError) as e:
            raise QMPConnectionError("QMP %s failed: connection lost (%s)"
                                     % (what, str(e) or type(e).__name__)) from None

    # ------------------------------------------------------------------ commands
    def execute(self, command: str, arguments: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Run a QMP command and return its 'return' value."""
        if self._qmp is None or self._closed:
            raise QMPConnectionError("QMP session is not connected")
        args = dict(arguments) if arguments else None
        return self._run(self._qmp.execute(command, args),
                         self.timeout if timeout is None else timeout, command)

    def hmp(self, command_line: str, *, timeout: float | None = None) -> str:
        """Run a human-monitor command; returns its text (HMP errors are text too)."""
        return self.execute("human-monitor-command", {"command-line": command_line},
                            timeout=timeout)

    # ------------------------------------------------------------------ events
    def listen(self, names: Iterable[str] | str | None = None, match: EventMatch | None = None,
               *, maxsize: int = 256) -> EventStream:
        """Register a bounded listener for `names` (all events if None) and `match`; returns
        an EventStream.  Register it before sending the command whose events you want."""
        if self._qmp is None or self._closed:
            raise QMPConnectionError("QMP session is not connected")
        qmp = self._qmp

        async def reg() -> BoundedListener:
            lst = BoundedListener(names, match, maxsize)
            qmp.register_listener(lst)
            self._listeners.add(lst)
            return lst
        return EventStream(self, self._run(reg(), 5.0, "listen"))

    def _unregister(self, listener: BoundedListener) -> None:
        qmp = self._qmp
        if qmp is None or self._loop is None:
            return

        async def unreg() -> None:
            if listener in self._listeners:
                self._listeners.discard(listener)
                qmp.remove_listener(listener)
        try:
            self._run(unreg(), 5.0, "unlisten")
        except QMPError:
            pass

    @property
    def listener_count(self) -> int:
        """How many EventStreams are registered (not closed) now."""
        return len(self._listeners)

    def recent_events(self, clear: bool = True) -> list[Event]:
        """The most recent events of any kind (at most event_buffer), oldest first."""
        if self._recent is None:
            return []
        rec = self._recent

        async def take() -> list[Event]:
            evs = rec.clear()
            if not clear:
                for e in evs:
                    rec._queue.put_nowait(e)
            return [_as_dict(e) for e in evs]
        return self._run(take(), 5.0, "events")
