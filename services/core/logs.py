"""Logging: one JSON object per line (or text for a terminal), every record carrying the id of
the request it belongs to. Nothing personal: log route templates, never raw paths or ids."""

from __future__ import annotations

import logging
import os
import re
import secrets
import sys
import threading
import time
from contextvars import ContextVar

from services.core.settings import Settings

REQUEST_ID: ContextVar[str | None] = ContextVar("request_id", default=None)
_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def request_id_from(header: bytes | None) -> str:
    """The caller's X-Request-ID if it is a sane token (so traces join up), else a new one."""
    if header:
        text = header.decode("latin-1")
        if _CLIENT_REQUEST_ID.match(text):
            return text
    return secrets.token_hex(16)  # 128 random bits, 32 hex digits (uuid4().hex costs 5x more per request)


def _stamp_request_id(factory):
    def make_record(*args, **kwargs) -> logging.LogRecord:
        record = factory(*args, **kwargs)
        record.request_id = REQUEST_ID.get()
        return record

    return make_record


# At record creation, so that every handler (ours, a test's, a library's) sees the id.
logging.setLogRecordFactory(_stamp_request_id(logging.getLogRecordFactory()))


def _fast_json_formatter() -> type[logging.Formatter]:
    """python-json-logger's OrjsonFormatter with the same output, at half the cost per line (the
    access log writes one per request): the extra fields merged in one pass over a precomputed
    skip set, and the date and time formatted once per second instead of with strftime per line."""
    from pythonjsonlogger.orjson import OrjsonFormatter

    class FastOrjsonFormatter(OrjsonFormatter):
        _second: int | None = None
        _second_text = ""

        def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:  # noqa: N802
            if datefmt or self.converter is not time.localtime:
                return super().formatTime(record, datefmt)
            second = int(record.created)
            if second != self._second:
                self._second_text = time.strftime(self.default_time_format, time.localtime(second))
                self._second = second
            return self.default_msec_format % (self._second_text, record.msecs)

        def add_fields(self, log_data: dict, record: logging.LogRecord, message_dict: dict) -> None:
            if self.defaults or self.static_fields or message_dict or self.timestamp or self.rename_fields_keep_missing:
                super().add_fields(log_data, record, message_dict)
                return
            rename, fields = self.rename_fields, record.__dict__
            for field in self._required_fields:
                log_data[rename.get(field, field)] = fields.get(field)
            skip = self._skip_fields
            for key, value in fields.items():
                if key not in skip and not (isinstance(key, str) and key.startswith("_")):
                    log_data[rename.get(key, key)] = value

    return FastOrjsonFormatter


FLUSH_INTERVAL_S = 0.25
# How far the writer may fall behind, in bytes: ~10 s of the access log at ingest's peak. Past it,
# new lines below WARNING are dropped and counted (cem_log_lines_dropped_total{level}); WARNING and
# above are kept up to 4 times as much, then dropped too, so memory stays bounded even if the fd
# never drains.
MAX_PENDING_BYTES = 8 * 1024 * 1024
WRITE_AT_ONCE_BYTES = 64 * 1024  # more pending than this: the writer writes again without waiting
FLUSH_TIMEOUT_S = 2.0  # how long flush() (at exit) waits for a stalled fd before giving up


class BackgroundLogHandler(logging.Handler):
    """Formats on the caller's thread and appends the line to memory; one writer thread does every
    write to the file descriptor. A slow write (a full pipe, a log driver applying backpressure,
    writeback throttling) then stalls only the writer, never the event loop.

    Lines below WARNING reach the fd within `interval_s` (one write for all of them); WARNING and
    above wake the writer at once (after what came before them, in order). If the writer falls
    behind by more than `max_pending_bytes`, new lines below WARNING are dropped and counted, and
    the writer says how many in a line of its own once it caught up."""

    def __init__(
        self, fd: int, interval_s: float = FLUSH_INTERVAL_S, max_pending_bytes: int = MAX_PENDING_BYTES,
        encoding: str = "utf-8",
    ) -> None:  # fmt: skip
        super().__init__()
        self._fd = fd
        self._interval_s = interval_s
        self._max_pending = max_pending_bytes
        self._max_pending_warnings = 4 * max_pending_bytes
        self._encoding = encoding
        # The lines waiting, encoded into one buffer (as a buffered stream would: the line's text
        # is freed at once, and the memory stays the same few blocks). Swapped out by the writer
        # under a lock of its own, never held while waiting: logging.shutdown() holds the
        # handler's lock while it calls flush(), which waits for the writer.
        self._buffer_lock = threading.Lock()
        self._buffer = bytearray()
        self._dropped: dict[str, int] = {}  # per level, since the writer last said so
        self._writing = False
        self._wake = threading.Event()
        self._idle = threading.Condition(threading.Lock())
        self._closed = False
        self._writer = threading.Thread(target=self._write_forever, name="log-writer", daemon=True)
        self._writer.start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except RecursionError:
            raise
        except Exception:  # noqa: BLE001 - as logging.StreamHandler: report, never raise
            self.handleError(record)
            return
        data = (line + "\n").encode(self._encoding, "backslashreplace")
        warning = record.levelno >= logging.WARNING
        with self._buffer_lock:
            size = len(self._buffer) + len(data)
            if size <= self._max_pending or (warning and size <= self._max_pending_warnings):
                self._buffer += data
                data = b""
            else:
                self._dropped[record.levelname] = self._dropped.get(record.levelname, 0) + 1
        if data:
            _count_dropped(record.levelname)
        elif warning:
            self._wake.set()

    def _write_forever(self) -> None:
        while True:
            if len(self._buffer) < WRITE_AT_ONCE_BYTES:
                self._wake.wait(self._interval_s)
            self._wake.clear()
            if not self._write_pending() and self._closed:
                return

    def _write_pending(self) -> bool:
        """Write what is pending; False if there was nothing."""
        with self._buffer_lock:
            if not self._buffer and not self._dropped:
                return False
            self._writing = True  # before the buffer is emptied: flush() must not see neither
            data, self._buffer = self._buffer, bytearray()
            dropped, self._dropped = self._dropped, {}
        try:
            if dropped:
                data += (self._dropped_line(dropped) + "\n").encode(self._encoding, "backslashreplace")
            self._write_all(data)
        finally:
            with self._idle:
                self._writing = False
                self._idle.notify_all()
        return True

    def _dropped_line(self, dropped: dict[str, int]) -> str:
        counts = ", ".join(f"{count} {level}" for level, count in sorted(dropped.items()))
        record = logging.makeLogRecord({
            "name": "cem.logs", "levelno": logging.WARNING, "levelname": "WARNING", "dropped": dropped,
            "msg": "log lines dropped while the log output was slower than the process: %s", "args": (counts,),
        })  # fmt: skip
        try:
            return self.format(record)
        except Exception:  # noqa: BLE001 - a formatter that cannot: say it plainly
            return record.getMessage()

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                written = os.write(self._fd, view)
            except InterruptedError:
                continue
            except OSError:
                return  # the fd is gone (closed, EPIPE): nowhere to write, as for a StreamHandler
            view = view[written:]

    def flush(self, timeout_s: float = FLUSH_TIMEOUT_S) -> None:
        """Wait until what was logged so far is written, at most `timeout_s` (a stalled fd must
        not hang the process's exit)."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._buffer or self._writing:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._writer.is_alive():
                    return
                self._wake.set()
                self._idle.wait(min(remaining, 0.05))

    def close(self) -> None:
        self.flush()
        self._closed = True
        self._wake.set()
        super().close()


def _count_dropped(level: str) -> None:
    from services.core.metrics import LOG_LINES_DROPPED  # not at import: logs come first

    LOG_LINES_DROPPED.labels(level).inc()


def setup_logging(settings: Settings) -> None:
    handler: logging.Handler
    try:
        handler = BackgroundLogHandler(sys.stderr.fileno(), encoding=sys.stderr.encoding or "utf-8")
    except (AttributeError, OSError, ValueError):  # stderr without a file descriptor (replaced, closed)
        handler = logging.StreamHandler(sys.stderr)
    if settings.log_format == "json":
        # orjson: the same fields as python-json-logger's JsonFormatter, a quarter cheaper per line
        # (the access log writes one per request).
        handler.setFormatter(
            _fast_json_formatter()("%(asctime)s %(levelname)s %(name)s %(message)s", rename_fields={"levelname": "level"})
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    logging.basicConfig(level=settings.log_level, handlers=[handler], force=True)
    # No format of ours shows the process or the thread (the JSON one leaves them out by design):
    # LogRecord need not look them up, a fifth of the cost of the access log's line per request.
    logging.logProcesses = logging.logThreads = logging.logMultiprocessing = False
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
