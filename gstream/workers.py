"""A pre-fork supervisor: one listening socket, N worker processes, each a :class:`Server`.

:class:`Supervisor` binds the port once, forks ``workers`` processes that each
run gstream's :class:`gstream.server.Server` on the inherited socket, replaces
a worker that dies (with a bounded back-off, giving up on a crash loop), and
on SIGTERM/SIGINT drains every worker within the shutdown timeout. A worker whose
event loop stops running (a CPU-bound or unpatched blocking call holds it) stops
sending heartbeats and is killed and replaced after ``worker_timeout``. ``gstream
serve --workers N`` uses it. The reasoning is in docs/server.md ("Workers").
"""

from __future__ import annotations

import enum
import errno
import inspect
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from gevent import monkey

from . import limits
from .server import Server, base_url

__all__ = ["Supervisor", "WorkerState", "check_workers", "BOOT_ERROR"]

log = logging.getLogger("gstream.workers")

#: Exit status of a worker that could not load the application (or build its server).
BOOT_ERROR = 3
#: A worker that ends within this many seconds of its start is a fast failure.
FAST_FAILURE_SECONDS = 10.0
#: After this many fast failures in a row of one worker slot the supervisor gives up (exit
#: status 1). Counted per slot: one worker's crash loop is bounded by its own back-off,
#: however many workers there are.
MAX_FAST_FAILURES = 5
#: Back-off before replacing a worker after the k-th fast failure in a row:
#: ``min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (k - 1))`` seconds.
BACKOFF_FIRST = 0.1
BACKOFF_MAX = 2.0
#: Seconds past the shutdown timeout a draining worker gets (its server cuts
#: what is left at the deadline and takes up to 1 s more) before SIGKILL.
KILL_GRACE = 3.0
#: How long the supervisor sleeps at most between two looks at its workers.
_TICK = 0.5
#: A worker sends a heartbeat this many times per ``worker_timeout``.
HEARTBEATS_PER_TIMEOUT = 4

WSGIApp = Callable[..., Any]


class WorkerState(enum.Enum):
    """Where a worker process is in its life, as the supervisor sees it."""

    STARTING = "starting"
    """Forked; loading the application and starting its server."""
    READY = "ready"
    """Its server accepts connections."""
    STOPPING = "stopping"
    """Asked to drain (SIGTERM sent), or killed."""


class _Phase(enum.Enum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


def check_workers(workers: int) -> int:
    """``workers`` if between 1 and :func:`gstream.limits.max_workers`, else ValueError (the range)."""
    top = limits.max_workers()
    if not isinstance(workers, int) or isinstance(workers, bool) or not 1 <= workers <= top:
        raise ValueError(f"workers must be between 1 and {top} ({limits.WORKERS_PER_CPU} x "
                         f"{os.cpu_count() or 1} CPUs), got {workers!r}")
    return workers


class _Worker:
    """The supervisor's record of one worker process."""

    __slots__ = ("slot", "pid", "started", "state", "last_beat")

    def __init__(self, slot: int, pid: int) -> None:
        self.slot = slot
        self.pid = pid
        self.started = time.monotonic()
        self.state = WorkerState.STARTING
        self.last_beat = self.started  # its last "<pid>\n" on the ready pipe


# The supervisor never runs gevent's loop: in a monkey-patched process it
# uses the original blocking calls (gevent's waitpid would watch children
# through the loop, and its select would run the hub in the parent).
_select = monkey.get_original("select", "select")
_waitpid = monkey.get_original("os", "waitpid")
_set_signal = monkey.get_original("signal", "signal")
_Socket = monkey.get_original("socket", "socket")
_fork = monkey.get_original("os", "fork")


class Supervisor:
    """Serve a WSGI app from ``workers`` processes sharing one listening socket.

    Give either ``app`` (imported before the fork: every worker starts from
    the parent's copy) or ``load_app`` (called in each worker after the fork,
    which is what ``gstream serve`` does: nothing the application creates at
    import, a connection, a thread, a greenlet, is shared between processes).
    Only the parent binds; each worker runs a :class:`gstream.server.Server`
    on the inherited socket. ``options`` are :class:`Server` arguments and
    apply per worker (``max_connections`` is per worker). Memory is per worker
    too: an in-memory broker, hub, topic or presence registry only reaches
    its own worker's clients (use the Redis backplane, docs/redis.md).

    Args:
        app: the WSGI application (imported before forking), or None.
        host, port: where to listen (port 0 picks a free port; see :attr:`port`).
        workers: how many worker processes (1 to :func:`gstream.limits.max_workers`).
        load_app: returns the application; called in each worker after fork.
        ready: called in the parent with the supervisor once every worker
            serves (once, at start).
        on_server: called in each worker with its :class:`Server` before it starts.
        boot_timeout: seconds a worker has to start serving before it is killed.
        worker_timeout: seconds a serving worker may go without a heartbeat
            (its event loop sends one every ``worker_timeout / 4``) before it
            is killed and replaced; None never kills.
        options: :class:`Server` keyword arguments (``backlog`` is the listen
            backlog of the shared socket; ``shutdown_timeout`` also bounds the
            supervisor's shutdown).
    """

    def __init__(
        self,
        app: WSGIApp | None = None,
        host: str = "127.0.0.1",
        port: int = 8000,
        *,
        workers: int = 2,
        load_app: Callable[[], WSGIApp] | None = None,
        ready: Callable[[Supervisor], Any] | None = None,
        on_server: Callable[[Server], Any] | None = None,
        boot_timeout: float = 60.0,
        worker_timeout: float | None = 30.0,
        **options: Any,
    ) -> None:
        if (app is None) == (load_app is None):
            raise ValueError("give exactly one of app and load_app")
        if worker_timeout is not None and not worker_timeout > 0:
            raise ValueError(f"worker_timeout must be positive or None, got {worker_timeout!r}")
        self.workers = check_workers(workers)
        bad = (set(options) - set(inspect.signature(Server).parameters)) | (
            {"app", "host", "port", "listener"} & set(options))
        if bad:
            raise TypeError(f"not Server options here: {sorted(bad)}")
        self.host = host
        self.requested_port = port
        self.backlog: int = options.pop("backlog", None) or limits.default_backlog()
        """The listen backlog of the shared socket (the kernel clamps it to somaxconn)."""
        self.shutdown_timeout: float = options.get("shutdown_timeout", 10.0)
        self.boot_timeout = boot_timeout
        self.worker_timeout = worker_timeout
        self.options = options
        self.failure: str | None = None
        """Why the supervisor gave up (a crash loop), or None."""
        self._load: Callable[[], WSGIApp] = load_app if load_app is not None else _Preloaded(app)
        self._ready = ready
        self._on_server = on_server
        self._secure = bool(options.get("certfile"))
        self._listener: socket.socket | None = None
        self._children: dict[int, _Worker] = {}
        self._respawn: dict[int, float] = {}  # slot -> not before (monotonic)
        self._fast_failures: dict[int, int] = {}  # slot -> fast failures in a row
        self._phase = _Phase.STARTING
        self._stop_signals = 0
        self._ready_buf = b""
        self._fds: list[int] = []
        self._ready_r = self._ready_w = self._alive_r = self._alive_w = -1
        self._wake_r = self._wake_w = -1

    # -- introspection -----------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) once bound (:meth:`bind` or :meth:`run`)."""
        if self._listener is None:
            return self.host, self.requested_port
        addr = self._listener.getsockname()
        return addr[0], addr[1]

    @property
    def port(self) -> int:
        """The bound port (the real one when created with port 0, once bound)."""
        return self.address[1]

    @property
    def url(self) -> str:
        """The base URL, e.g. ``http://127.0.0.1:8000``."""
        return base_url(*self.address, self._secure)

    @property
    def pids(self) -> list[int]:
        """The worker processes alive now (ready or not)."""
        return sorted(self._children)

    # -- running -----------------------------------------------------------

    def bind(self) -> None:
        """Bind and listen (once; :meth:`run` does it if not done)."""
        if self._listener is not None:
            return
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = _Socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.requested_port))
            sock.listen(self.backlog)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._listener = sock

    def run(self) -> int:
        """Bind, start the workers and supervise them until told to stop.

        Returns the exit status: 0 after a shutdown by SIGTERM/SIGINT (every
        worker drained, stragglers killed at the deadline), 1 when workers
        kept failing (:attr:`failure` says why). Installs SIGTERM, SIGINT and
        SIGCHLD handlers for its duration; call it from the main thread.
        """
        self.bind()
        log.warning("gstream: %d worker processes; each has its own memory, so an in-memory "
                    "broker, hub, topic or presence registry reaches only its own worker's "
                    "clients: publish through the Redis backplane (docs/redis.md)", self.workers)
        self._open_pipes()
        saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)}
        old_wakeup = signal.set_wakeup_fd(self._wake_w)
        try:
            _set_signal(signal.SIGTERM, self._on_stop_signal)
            _set_signal(signal.SIGINT, self._on_stop_signal)
            _set_signal(signal.SIGCHLD, _on_child)
            for slot in range(self.workers):
                self._spawn(slot)
            self._supervise()
            return 0 if self.failure is None else 1
        finally:
            signal.set_wakeup_fd(old_wakeup)
            for signum, handler in saved.items():
                _set_signal(signum, handler if handler is not None else signal.SIG_DFL)
            self._close()

    # -- parent --------------------------------------------------------------

    def _open_pipes(self) -> None:
        # workers -> parent: "<pid>\n" once serving, then as heartbeats (atomic: < PIPE_BUF)
        self._ready_r, self._ready_w = os.pipe()
        self._alive_r, self._alive_w = os.pipe()  # parent holds the write end; EOF: it is gone
        self._wake_r, self._wake_w = os.pipe()  # signal wakeups
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        self._fds = [self._ready_r, self._ready_w, self._alive_r, self._alive_w,
                     self._wake_r, self._wake_w]

    def _close(self) -> None:
        for fd in self._fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds = []
        if self._listener is not None:
            self._listener.close()
            self._listener = None

    def _on_stop_signal(self, signum: int, frame: Any) -> None:
        self._stop_signals += 1

    def _spawn(self, slot: int) -> None:
        # Signals stay blocked across fork, so the child can reset its
        # handlers before any of the parent's run in it.
        blocked = {signal.SIGTERM, signal.SIGINT, signal.SIGCHLD}
        old_mask = signal.pthread_sigmask(signal.SIG_BLOCK, blocked)
        try:
            pid = _fork()
            if pid == 0:
                self._worker_main(slot, old_mask)
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old_mask)
        self._children[pid] = _Worker(slot, pid)
        log.info("worker %d (pid %d) started", slot, pid)

    def _supervise(self) -> None:
        stop_seen = 0
        while True:
            self._wait(self._next_timeout())
            self._read_ready()
            self._reap()
            if self._stop_signals > stop_seen:
                stop_seen = self._stop_signals
                break
            if self.failure is not None:
                break
            self._check_boot_timeouts()
            self._check_heartbeats()
            self._respawn_due()
            if self._phase == _Phase.STARTING and self._all_ready():
                self._phase = _Phase.RUNNING
                log.info("gstream serving on %s with %d workers (pids %s)", self.url,
                         self.workers, " ".join(map(str, self.pids)))
                if self._ready is not None:
                    self._ready(self)
        self._shutdown(stop_seen)

    def _all_ready(self) -> bool:
        return (len(self._children) == self.workers
                and all(w.state == WorkerState.READY for w in self._children.values()))

    def _next_timeout(self) -> float:
        now = time.monotonic()
        due = [t - now for t in self._respawn.values()]
        return max(0.0, min([_TICK, *due]))

    def _wait(self, timeout: float) -> None:
        try:
            readable = _select([self._ready_r, self._wake_r], [], [], timeout)[0]
        except InterruptedError:  # (PEP 475 retries; a handler's wakeup byte ends it)
            return
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 512):
                    pass
            except BlockingIOError:
                pass

    def _read_ready(self) -> None:
        for _ in range(64):  # (the parent holds a write end: no EOF)
            if not _select([self._ready_r], [], [], 0)[0]:
                break
            self._ready_buf += os.read(self._ready_r, 4096)
        *lines, self._ready_buf = self._ready_buf.split(b"\n")
        now = time.monotonic()
        for line in lines:
            worker = self._children.get(int(line) if line.isdigit() else 0)
            if worker is None:
                continue
            worker.last_beat = now
            if worker.state != WorkerState.STARTING:
                continue
            worker.state = WorkerState.READY
            log.log(logging.INFO if self._phase == _Phase.RUNNING else logging.DEBUG,
                    "worker %d (pid %d) ready", worker.slot, worker.pid)

    def _reap(self) -> None:
        # Each worker by its pid, not waitpid(-1): other children of the
        # process (an application's subprocesses) are not the supervisor's to reap.
        for pid in list(self._children):
            try:
                done, status = _waitpid(pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere: its status is lost
                done, status = pid, 0
            if done == pid:
                self._ended(self._children.pop(pid), status)

    def _ended(self, worker: _Worker, status: int) -> None:
        lived = time.monotonic() - worker.started
        how = _describe(status)
        if self._phase == _Phase.STOPPING:
            log.info("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return
        fast = self._fast_failures.get(worker.slot, 0) + 1 if lived < FAST_FAILURE_SECONDS else 0
        self._fast_failures[worker.slot] = fast
        if fast >= MAX_FAST_FAILURES:
            self.failure = (f"worker {worker.slot} ended {fast} times in a row within "
                            f"{FAST_FAILURE_SECONDS:.0f} s of starting (the last, pid "
                            f"{worker.pid}, {how})")
            log.error("gstream: giving up: %s", self.failure)
            return
        delay = min(BACKOFF_MAX, BACKOFF_FIRST * 2 ** (fast - 1)) if fast else 0.0
        log.warning("worker %d (pid %d) %s after %.1f s; starting a replacement%s", worker.slot,
                    worker.pid, how, lived, f" in {delay:.1f} s" if delay else "")
        self._respawn[worker.slot] = time.monotonic() + delay

    def _respawn_due(self) -> None:
        now = time.monotonic()
        for slot, when in sorted(self._respawn.items()):
            if when <= now:
                del self._respawn[slot]
                self._spawn(slot)

    def _check_boot_timeouts(self) -> None:
        now = time.monotonic()
        for worker in self._children.values():
            if worker.state == WorkerState.STARTING and now - worker.started > self.boot_timeout:
                _kill_stuck(worker, f"did not start serving within {self.boot_timeout:.0f} s")

    def _check_heartbeats(self) -> None:
        if self.worker_timeout is None:
            return
        now = time.monotonic()
        for worker in self._children.values():
            if worker.state == WorkerState.READY and now - worker.last_beat > self.worker_timeout:
                _kill_stuck(worker, f"sent no heartbeat for {now - worker.last_beat:.1f} s (its "
                                    "event loop is blocked: a CPU-bound or unpatched blocking call?)")

    def _shutdown(self, stop_seen: int) -> None:
        """SIGTERM every worker (each drains), SIGKILL what is left at the deadline."""
        self._phase = _Phase.STOPPING
        self._respawn.clear()
        if self.failure is None:
            log.info("shutting down %d workers (deadline %.1f s)", len(self._children),
                     self.shutdown_timeout)
        if self._listener is not None:  # the workers close theirs as they drain
            self._listener.close()
            self._listener = None
        for worker in self._children.values():
            worker.state = WorkerState.STOPPING
            _kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + max(0.0, self.shutdown_timeout) + KILL_GRACE
        while self._children and time.monotonic() < deadline:
            self._wait(min(_TICK, max(0.0, deadline - time.monotonic())))
            self._read_ready()  # heartbeats of draining workers: read, or the wait spins
            self._reap()
            if self._stop_signals > stop_seen:  # again: the workers cut their drains short
                stop_seen = self._stop_signals
                log.warning("received a stop signal again: asking the workers to stop now")
                for worker in self._children.values():
                    _kill(worker.pid, signal.SIGTERM)
        for worker in self._children.values():
            log.warning("worker %d (pid %d) still running at the deadline: killing it",
                        worker.slot, worker.pid)
            _kill(worker.pid, signal.SIGKILL)
        end = time.monotonic() + 5.0
        while self._children and time.monotonic() < end:
            self._wait(0.05)
            self._read_ready()
            self._reap()
        if self._children:
            log.error("%d workers could not be reaped", len(self._children))
        else:
            log.info("all workers stopped")

    # -- child ---------------------------------------------------------------

    def _worker_main(self, slot: int, mask: Any) -> NoReturn:
        """Run in the forked child: serve until drained, then ``os._exit``."""
        code = BOOT_ERROR
        try:
            signal.set_wakeup_fd(-1)
            _set_signal(signal.SIGCHLD, signal.SIG_DFL)
            _set_signal(signal.SIGTERM, signal.SIG_DFL)
            # Ctrl-C reaches every process of the group: the parent turns it
            # into one SIGTERM per worker (see Server.install_signal_handlers).
            _set_signal(signal.SIGINT, signal.SIG_IGN)
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)
            for fd in (self._ready_r, self._alive_w, self._wake_r, self._wake_w):
                os.close(fd)
            import gevent  # the hub, if the parent had one, must not share its loop

            gevent.reinit()
            try:
                app = self._load()
                server = Server(app, listener=self._listener, backlog=self.backlog,
                                **self.options)
                if self._on_server is not None:
                    self._on_server(server)
                server.start()
            except SystemExit as exc:  # load_app's usage errors
                log.error("worker %d (pid %d) could not load the application: %s", slot,
                          os.getpid(), exc)
                raise
            except BaseException:
                log.exception("worker %d (pid %d) could not load the application or start "
                              "its server", slot, os.getpid())
                raise
            code = 1
            os.write(self._ready_w, f"{os.getpid()}\n".encode())
            if self.worker_timeout is not None:
                gevent.spawn(_heartbeat, self._ready_w, self.worker_timeout / HEARTBEATS_PER_TIMEOUT)
            else:
                os.close(self._ready_w)
            gevent.spawn(_exit_with_parent, self._alive_r, server)
            server.install_signal_handlers((signal.SIGTERM,))
            server.serve_forever(install_signals=False)
            code = 0
        except BaseException:
            if code != BOOT_ERROR:
                log.exception("worker %d (pid %d) failed", slot, os.getpid())
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: S110 (a closed stream: nothing to flush)
                    pass
            os._exit(code)


class _Preloaded:
    """``load_app`` for an application imported before the fork."""

    __slots__ = ("app",)

    def __init__(self, app: Any) -> None:
        self.app = app

    def __call__(self) -> WSGIApp:
        return self.app


def _exit_with_parent(fd: int, server: Server) -> None:
    """In a worker: drain when the supervisor is gone (the pipe's write end closed)."""
    from gevent.socket import wait_read

    try:
        wait_read(fd)
    except OSError:
        return
    log.warning("the supervisor (pid %d) is gone: worker %d shutting down", os.getppid(),
                os.getpid())
    server.stop()


def _heartbeat(fd: int, interval: float) -> None:
    """In a worker: "<pid>\n" every ``interval`` s from the event loop, so only a running loop beats."""
    import gevent

    line = f"{os.getpid()}\n".encode()
    os.set_blocking(fd, False)  # a full pipe must not block the loop it reports on
    while True:
        gevent.sleep(interval)
        try:
            os.write(fd, line)  # a full pipe (a stuck supervisor) raises: stop beating
        except OSError:
            return


def _on_child(signum: int, frame: Any) -> None:
    """SIGCHLD: nothing to do here; the wakeup fd ends the supervisor's wait."""


def _kill_stuck(worker: _Worker, why: str) -> None:
    """SIGKILL a worker that will not serve (it is replaced when reaped), saying why."""
    log.error("worker %d (pid %d) %s: killing it", worker.slot, worker.pid, why)
    worker.state = WorkerState.STOPPING
    _kill(worker.pid, signal.SIGKILL)


def _kill(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except OSError as exc:  # already gone (reaped next time round)
        if exc.errno != errno.ESRCH:
            raise


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    code = os.waitstatus_to_exitcode(status)
    if code == BOOT_ERROR:
        return f"exited with status {code}: could not load the application or start (see above)"
    return f"exited with status {code}"
