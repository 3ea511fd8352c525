"""The log handler writes from a thread of its own (services/core/logs.py): a log output that
does not drain (a pipe nobody reads, a log driver applying backpressure) never blocks the
caller, which on a service is the event loop; memory stays bounded; lines arrive in order."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time

import orjson
import pytest

from services.core.logs import BackgroundLogHandler
from services.core.metrics import LOG_LINES_DROPPED
from services.core.settings import REPO_ROOT


def _logger(handler: logging.Handler, name: str) -> logging.Logger:
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger(name)
    logger.propagate = False
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    return logger


def _read_all(fd: int, until: bytes, timeout_s: float = 10.0) -> bytes:
    os.set_blocking(fd, False)
    data = b""
    deadline = time.monotonic() + timeout_s
    while not data.endswith(until) and time.monotonic() < deadline:
        try:
            chunk = os.read(fd, 1 << 20)
        except BlockingIOError:
            time.sleep(0.005)
            continue
        data += chunk
    return data


def _dropped(level: str) -> float:
    return LOG_LINES_DROPPED.labels(level)._value.get()


def test_a_pipe_nobody_reads_never_blocks_the_caller_and_lines_arrive_in_order_once_it_drains():
    read_end, write_end = os.pipe()  # a pipe holds 64 KiB: the writer blocks long before the end
    handler = BackgroundLogHandler(write_end, interval_s=0.01, max_pending_bytes=200_000)
    logger = _logger(handler, "cem.test.slow_pipe")
    line = "x" * 90
    dropped_before = _dropped("INFO")
    try:
        slowest_s = 0.0
        for number in range(5_000):  # ~500 KB: far more than the pipe holds, more than the cap
            started = time.perf_counter()
            logger.info("%05d %s", number, line)
            slowest_s = max(slowest_s, time.perf_counter() - started)
        assert len(handler._buffer) + 2 * len(line) > 200_000  # full: the next INFO line would be dropped
        started = time.perf_counter()
        logger.error("an error past the cap")  # WARNING and above are kept past the cap
        slowest_s = max(slowest_s, time.perf_counter() - started)
        # The caller never waited for the pipe (a blocked write would take until the read below).
        assert slowest_s < 0.05
        assert handler._writing  # the writer is stuck in its write to the full pipe
        dropped = int(_dropped("INFO") - dropped_before)
        assert 0 < dropped < 5_000

        reader = _Reader(read_end)  # the pipe drains from now on
        handler.flush(timeout_s=10)
        output = reader.stop().decode()
    finally:
        logger.handlers = []
        handler.close()
        os.close(write_end)
        os.close(read_end)

    lines = output.splitlines()
    info = [int(text.split()[1]) for text in lines if text.startswith("INFO ")]
    assert info == sorted(info)  # in order (while it was behind, some were dropped)
    reported = [int(text.rsplit(": ", 1)[1].removesuffix(" INFO")) for text in lines if "dropped" in text]
    assert sum(reported) == dropped and len(info) == 5_000 - dropped  # each line kept or counted
    assert lines.index("ERROR an error past the cap") > lines.index(f"INFO {info[-1]:05d} {line}")
    assert all(text.startswith(("INFO ", "ERROR ", "WARNING log lines dropped while the log output")) for text in lines)


class _Reader:
    """Reads a pipe in a thread until stopped."""

    def __init__(self, fd: int) -> None:
        self.fd, self.data, self.stopping = fd, bytearray(), False
        os.set_blocking(fd, False)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            try:
                self.data += os.read(self.fd, 1 << 20)
            except BlockingIOError:
                if self.stopping:
                    return
                time.sleep(0.002)

    def stop(self) -> bytes:
        time.sleep(0.05)
        self.stopping = True
        self.thread.join()
        return bytes(self.data)


def test_warnings_are_written_at_once_after_what_came_before_them():
    read_end, write_end = os.pipe()
    handler = BackgroundLogHandler(write_end, interval_s=60.0)  # only a warning wakes the writer
    logger = _logger(handler, "cem.test.warnings")
    try:
        logger.info("first")
        logger.warning("second")
        assert _read_all(read_end, until=b"second\n", timeout_s=5) == b"INFO first\nWARNING second\n"
        logger.info("third")
        handler.flush()
        assert _read_all(read_end, until=b"third\n", timeout_s=5) == b"INFO third\n"
    finally:
        logger.handlers = []
        handler.close()
        os.close(write_end)
        os.close(read_end)


def test_lines_below_warning_arrive_within_the_interval(tmp_path):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    handler = BackgroundLogHandler(fd, interval_s=0.05)
    logger = _logger(handler, "cem.test.interval")
    try:
        logger.info("only")
        deadline = time.monotonic() + 5
        while path.read_text() != "INFO only\n" and time.monotonic() < deadline:
            time.sleep(0.01)
        assert path.read_text() == "INFO only\n"
    finally:
        logger.handlers = []
        handler.close()
        os.close(fd)


def test_flush_gives_up_on_a_stalled_output_instead_of_hanging_the_exit():
    read_end, write_end = os.pipe()
    handler = BackgroundLogHandler(write_end, interval_s=0.01)
    logger = _logger(handler, "cem.test.stalled")
    try:
        for _ in range(2_000):
            logger.info("y" * 100)  # ~200 KB into a 64 KiB pipe nobody reads
        started = time.monotonic()
        handler.flush(timeout_s=0.3)
        assert 0.25 < time.monotonic() - started < 2
    finally:
        logger.handlers = []
        threading.Thread(target=_read_all, args=(read_end, b"never"), kwargs={"timeout_s": 3}, daemon=True).start()
        handler.close()
        os.close(write_end)


@pytest.mark.parametrize("count", [1, 1_000])
def test_many_threads_logging_at_once_lose_nothing(tmp_path, count):
    path = tmp_path / "log"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    handler = BackgroundLogHandler(fd, interval_s=0.01)
    logger = _logger(handler, f"cem.test.threads{count}")
    threads = [
        threading.Thread(target=lambda t=t: [logger.info("t%d n%d", t, n) for n in range(count)]) for t in range(4)
    ]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        handler.flush()
    finally:
        logger.handlers = []
        handler.close()
        os.close(fd)
    lines = path.read_text().splitlines()
    assert len(lines) == 4 * count
    for t in range(4):
        assert [line for line in lines if line.startswith(f"INFO t{t} ")] == [f"INFO t{t} n{n}" for n in range(count)]


def test_the_last_lines_before_the_process_exits_are_written_at_once():
    """logging.shutdown() flushes every handler while holding its lock: the writer must not need
    that lock, or the last lines are lost after a wait."""
    script = (
        "import logging\n"
        "from services.core.logs import setup_logging\n"
        "from services.core.settings import Settings\n"
        "setup_logging(Settings(log_format='json'))\n"
        "for n in range(3): logging.getLogger('cem.test').info('line %d', n)\n"
        "import time; print(time.time())\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30, cwd=REPO_ROOT)
    assert time.time() - float(done.stdout) < 1.5  # the exit did not wait out FLUSH_TIMEOUT_S (2 s)
    messages = [orjson.loads(line)["message"] for line in done.stderr.splitlines()]
    assert messages == ["line 0", "line 1", "line 2"]
