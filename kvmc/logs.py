"""A container's log: docker's json-file, capped and rotated; written by the monitor, read by
``kvmc logs`` and the API's ``/containers/{id}/logs`` through one reader.

**Format.** One JSON object per line of the file, one line of the process's output per
object, as docker's json-file driver writes them::

    {"log":"hello\\n","stream":"stdout","time":"2024-05-01T12:00:00.123456789Z"}

An entry's ``log`` ends with a newline unless it is *partial*: a line longer than
:data:`PARTIAL_MAX` (16 KiB, docker's buffer) is cut into entries of that size, and what is
left without a newline when the process ends is written as is. Output that JSON would blow
up (binary data: a NUL is six bytes as ``\\u0000``, invalid UTF-8 cannot be stored at all)
goes into ``log_b64`` instead of ``log``, base64 (4/3 of its size), so that the bytes come back
exactly and a NUL flood costs 1.33x, not 6x (measured in tests/unit/test_logs.py).

**Cap and rotation.** ``container.log`` grows to ``max-size`` bytes, then becomes
``container.log.1`` (``.1`` becomes ``.2``, ...; ``max-file`` files in all), as docker's
json-file does with ``--log-opt max-size=... --log-opt max-file=...``; with ``max-file=1`` the
file is truncated. kvmc's default (config keys ``log_max_size``/``log_max_file``): 20m x 5 files,
the budget of docker's ``local`` driver. ``max-size=-1``: no cap (docker's json-file default).

**Reading.** ``tail`` counts entries (lines) and reads the newest file backwards from its
end, then older files only as far as needed: its cost does not depend on the log's size.
``since``/``until`` filter after the tail, as docker does. ``follow`` polls the file and
notices rotation (the path then names a new file: the old one, still open, is drained first).
"""

from __future__ import annotations

import base64
import calendar
import functools
import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Mapping

from kvmc.errors import UsageError

LOG_FILE = "container.log"
POLL_S = 0.1
PARTIAL_MAX = 16 * 1024
"""Longest entry: a longer line is split (docker's copier uses the same 16 KiB)."""
READ_BLOCK = 64 * 1024
FOLLOW_READ = 1 << 20
DEFAULT_MAX_SIZE = "20m"
DEFAULT_MAX_FILE = 5
LOG_OPT_KEYS = ("max-size", "max-file")


# ------------------------------------------------------------------ options
_HUMAN_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)", re.IGNORECASE)
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12, "p": 10**15}


def parse_human_size(text: str) -> int:
    """docker's ``units.FromHumanSize`` (what json-file's max-size takes): decimal units,
    ``10m`` = 10,000,000 bytes, ``1.5g``, ``512k``, ``100`` (bytes)."""
    match = _HUMAN_SIZE.fullmatch(str(text).strip())
    if not match:
        raise UsageError(f'invalid size "{text}": use e.g. 10m or 1g')
    return int(float(match[1]) * _DECIMAL[match[2].lower()])


@dataclass(frozen=True)
class LogOptions:
    """A container's log cap: ``max_size`` bytes per file (None: no cap), ``max_file`` files."""

    max_size: int | None = parse_human_size(DEFAULT_MAX_SIZE)
    max_file: int = DEFAULT_MAX_FILE

    @property
    def budget(self) -> int | None:
        """The most the log takes on disk (None: unbounded)."""
        return None if self.max_size is None else self.max_size * self.max_file


def log_options(opts: Mapping[str, str]) -> LogOptions:
    """``max-size`` and ``max-file`` (docker's json-file ``--log-opt``s; both given, defaults
    resolved by :func:`resolve_log_opts`) as LogOptions; UsageError on anything else."""
    unknown = sorted(set(opts) - set(LOG_OPT_KEYS))
    if unknown:
        raise UsageError(f"unknown log option {unknown[0]!r}: kvmc's json-file log takes max-size and max-file")
    raw_size = str(opts.get("max-size", DEFAULT_MAX_SIZE)).strip()
    if raw_size == "-1":
        max_size = None
    else:
        max_size = parse_human_size(raw_size)
        if max_size <= 0:
            raise UsageError("log option max-size must be a positive size (or -1: no cap)")
    raw_files = str(opts.get("max-file", DEFAULT_MAX_FILE)).strip()
    try:
        max_file = int(raw_files)
    except ValueError:
        raise UsageError(f'invalid log option max-file "{raw_files}": a number of files') from None
    if max_file < 1:
        raise UsageError("log option max-file cannot be less than 1")
    if max_file > 1 and max_size is None:
        raise UsageError("log option max-file needs max-size: without a cap there is nothing to rotate")
    return LogOptions(max_size, max_file)


def resolve_log_opts(given: Mapping[str, str] | None, default_size: str = DEFAULT_MAX_SIZE,
                     default_files: int = DEFAULT_MAX_FILE) -> dict[str, str]:
    """A container's log options as recorded (docker's HostConfig.LogConfig.Config): what was
    given, the configured defaults for the rest (no cap, ``-1``, means one file); checked."""
    given = dict(given or {})
    size = str(given.get("max-size", default_size)).strip()
    files = str(given.get("max-file", "1" if size == "-1" else default_files)).strip()
    opts = {**given, "max-size": size, "max-file": files}
    log_options(opts)
    return opts


def parse_log_opt_flags(flags: list[str] | None) -> dict[str, str]:
    """``--log-opt KEY=VALUE`` flags as a dict."""
    opts = {}
    for flag in flags or []:
        key, sep, value = flag.partition("=")
        if not sep or not key:
            raise UsageError(f'invalid --log-opt "{flag}": use KEY=VALUE, e.g. max-size=10m')
        opts[key.strip()] = value.strip()
    return opts


# ------------------------------------------------------------------ writing
def now_ns_iso() -> str:
    """Now as RFC 3339 with nanoseconds, docker's json-file time."""
    ns = time.time_ns()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ns // 10**9)) + f".{ns % 10**9:09d}Z"


def _encode(stream: bytes, stamp: bytes, data: bytes) -> bytes:
    """One entry's line."""
    try:
        text = json.dumps(data.decode(), ensure_ascii=False).encode()
        # Escapes (a NUL is \u0000) must not cost more than base64 would.
        if len(text) <= len(data) * 4 // 3 + 8:
            return b'{"log":' + text + b',"stream":"' + stream + b'","time":"' + stamp + b'"}\n'
    except UnicodeDecodeError:
        pass  # not UTF-8: JSON cannot hold it, base64 keeps it exact
    return (b'{"log_b64":"' + base64.b64encode(data) + b'","stream":"' + stream + b'","time":"' + stamp
            + b'"}\n')


class LogWriter:
    """The monitor's side: output frames in, json-file entries out, capped and rotated.

    Never raises for a write that fails (a full disk): the container must go on running. What
    could not be written is counted, and said (as kvmc's line on stderr) once writing works
    again.
    """

    def __init__(self, path: Path, opts: LogOptions = LogOptions()) -> None:
        self.path = path
        self.opts = opts
        self._partial: dict[str, bytearray] = {"stdout": bytearray(), "stderr": bytearray()}
        self._last: tuple[bytes, bytes] | None = None  # (line, its JSON): `yes` repeats itself
        self.lost = 0
        """Bytes of output that could not be written since the last successful write."""
        self._file: BinaryIO | None = None
        self.size = 0
        self._open()

    def _open(self) -> None:
        try:
            self._file = self.path.open("ab", buffering=0)
            self.size = self._file.seek(0, os.SEEK_END)
        except OSError:
            self._file = None

    # -------------------------------------------------------------- input
    def write(self, stream: str, data: bytes) -> None:
        """Output of the process: complete lines become entries, the rest waits for its newline
        (or until it is PARTIAL_MAX long, or :meth:`flush`)."""
        pending = self._partial[stream]
        pending += data
        if b"\n" not in data and len(pending) < PARTIAL_MAX:
            return
        stamp = now_ns_iso().encode()
        sname = stream.encode()
        lines = pending.split(b"\n")
        rest = lines.pop()
        out = []
        for line in lines:
            line = bytes(line) + b"\n"
            while len(line) > PARTIAL_MAX:
                out.append(_encode(sname, stamp, line[:PARTIAL_MAX]))
                line = line[PARTIAL_MAX:]
            if self._last is not None and self._last[0] == line:
                out.append(self._last[1] + sname + b'","time":"' + stamp + b'"}\n')
            else:
                entry = _encode(sname, stamp, line)
                cut = entry.rindex(b'","stream":"') + len(b'","stream":"') if entry.startswith(b'{"log":') else 0
                if cut:
                    self._last = (line, entry[:cut])
                out.append(entry)
        while len(rest) >= PARTIAL_MAX:
            out.append(_encode(sname, stamp, bytes(rest[:PARTIAL_MAX])))
            del rest[:PARTIAL_MAX]
        self._partial[stream] = bytearray(rest)
        self._emit(out, sum(len(ln) for ln in lines) + len(lines))

    def flush(self) -> None:
        """Write what waits for a newline as partial entries (the process ended)."""
        stamp = now_ns_iso().encode()
        for stream, pending in self._partial.items():
            if pending:
                self._emit([_encode(stream.encode(), stamp, bytes(pending))], len(pending))
                pending.clear()

    def note(self, stream: str, text: str) -> None:
        """One line of kvmc's own (e.g. why the process did not start)."""
        self.flush()
        self._emit([_encode(stream.encode(), now_ns_iso().encode(), text.encode() + b"\n")], 0)

    def close(self) -> None:
        self.flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    # ------------------------------------------------------------- output
    def _emit(self, entries: list[bytes], output_bytes: int) -> None:
        if not entries:
            return
        if self.lost and self._file is not None:
            lost, self.lost = self.lost, 0
            notice = f"kvmc: {lost} bytes of the container's output were not logged: the disk was full\n"
            if not self._put([_encode(b"stderr", now_ns_iso().encode(), notice.encode())]):
                self.lost += lost
        if not self._put(entries):
            self.lost += output_bytes

    def _put(self, entries: list[bytes]) -> bool:
        """Append ``entries``, rotating whenever the next one would pass max-size (so a burst
        bigger than a file fills several); False if a write failed (what was written of the
        failed part is taken back: no torn entry is left)."""
        if self._file is None:
            self._open()
            if self._file is None:
                return False
        limit = self.opts.max_size
        if limit is None:
            return self._append(b"".join(entries))
        budget = limit * self.opts.max_file
        if sum(map(len, entries)) > budget:  # more than every file holds: only the newest can stay
            kept, total = [], 0
            for entry in reversed(entries):
                total += len(entry)
                if total > budget:
                    break
                kept.append(entry)
            entries = kept[::-1]
        group: list[bytes] = []
        size = self.size
        for entry in entries:
            if size and size + len(entry) > limit:
                if group and not self._append(b"".join(group)):
                    return False
                group, size = [], 0
                try:
                    self._rotate()
                except OSError:
                    return False
            group.append(entry)
            size += len(entry)
        return self._append(b"".join(group)) if group else True

    def _append(self, data: bytes) -> bool:
        assert self._file is not None
        try:
            written = self._file.write(data)
            self.size += written
            if written != len(data):  # a short write: the disk filled up in the middle
                self._file.truncate(self.size - written)
                self.size -= written
                return False
            return True
        except OSError:
            try:  # never leave a torn entry behind
                self._file.truncate(self.size)
            except (OSError, ValueError):
                pass
            return False

    def _rotate(self) -> None:
        assert self._file is not None
        if self.opts.max_file <= 1:
            self._file.truncate(0)
            self.size = 0
            return
        self._file.close()
        self._file = None
        for index in range(self.opts.max_file - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            newer = self.path if index == 1 else self.path.with_name(f"{self.path.name}.{index - 1}")
            if newer.exists():
                os.replace(newer, older)
        self._open()
        if self._file is None:
            raise OSError("cannot open a new log file")


# ------------------------------------------------------------------ reading
@dataclass(frozen=True)
class LogEntry:
    """One entry: ``data`` ends with a newline unless the entry is partial."""

    stream: str
    time: str
    data: bytes


def _decode(line: bytes) -> LogEntry | None:
    try:
        obj = json.loads(line)
        if "log_b64" in obj:
            data = base64.b64decode(obj["log_b64"])
        else:
            data = obj["log"].encode()
        return LogEntry(str(obj["stream"]), str(obj.get("time", "")), data)
    except (ValueError, KeyError, TypeError, AttributeError):
        return None  # not an entry (torn by a crash): skipped


def log_files(path: Path) -> list[Path]:
    """The log's files, oldest first (rotated ``.N`` ... ``.1``, then ``path``)."""
    rotated = []
    for candidate in path.parent.glob(f"{path.name}.*"):
        suffix = candidate.name[len(path.name) + 1:]
        if suffix.isdigit():
            rotated.append((int(suffix), candidate))
    return [p for _, p in sorted(rotated, reverse=True)] + [path]


def _last_lines(f: BinaryIO, end: int, count: int) -> list[bytes]:
    """The last ``count`` complete lines before offset ``end``, reading backwards by blocks."""
    lines: list[bytes] = []
    pos = end
    carry = b""
    while pos > 0 and len(lines) < count:
        step = min(READ_BLOCK, pos)
        pos -= step
        f.seek(pos)
        block = f.read(step) + carry
        parts = block.split(b"\n")
        carry = parts.pop(0)  # may continue in the previous block
        lines[:0] = [p for p in parts if p]
    if pos == 0 and carry:
        lines.insert(0, carry)
    return lines[-count:] if count else []


def _complete_end(f: BinaryIO) -> int:
    """The offset just after the file's last newline (a line being written is not read)."""
    end = f.seek(0, os.SEEK_END)
    pos = end
    while pos > 0:
        step = min(READ_BLOCK, pos)
        f.seek(pos - step)
        block = f.read(step)
        cut = block.rfind(b"\n")
        if cut >= 0:
            return pos - step + cut + 1
        pos -= step
    return 0


_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.(\d+))?Z")


@functools.lru_cache(maxsize=1024)
def _utc_seconds(stamp: str) -> int:
    """``YYYY-MM-DDTHH:MM:SS`` (UTC) as seconds since the epoch (entries share their second)."""
    return calendar.timegm((int(stamp[0:4]), int(stamp[5:7]), int(stamp[8:10]), int(stamp[11:13]),
                            int(stamp[14:16]), int(stamp[17:19]), 0, 0, 0))


def entry_time_ns(text: str) -> int | None:
    """A log entry's time (kvmc writes ``...T12:00:00.123456789Z``) in ns since the epoch."""
    match = _TIME.fullmatch(text)
    if not match:
        return None
    fraction = (match[2] or "0")[:9].ljust(9, "0")
    return _utc_seconds(match[1]) * 10**9 + int(fraction)


_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 10**3, "µs": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def parse_log_time(text: str, now_ns: int | None = None) -> int:
    """docker's ``--since``/``--until`` (api/types/time.GetTimestamp) as ns since the epoch: a
    Go duration before now (``10m``, ``1h30m``), an RFC 3339 time (``2024-05-01T12:00:00Z``, a
    date, no zone = UTC here), or a Unix time (``1714564800``, ``1714564800.5``: what the
    docker CLI sends to the API)."""
    value = str(text).strip()
    now_ns = time.time_ns() if now_ns is None else now_ns
    if value and _DURATION.sub("", value) == "" and not value.replace(".", "").isdigit():
        total = sum(float(n) * _UNIT_NS[u] for n, u in _DURATION.findall(value))
        return now_ns - int(total)
    if re.fullmatch(r"\d+(\.\d+)?", value):
        whole, _, fraction = value.partition(".")
        return int(whole) * 10**9 + int((fraction or "0")[:9].ljust(9, "0"))
    iso = value.replace("z", "Z")
    match = re.fullmatch(r"(\d{4}-\d\d-\d\d)(?:[T ](\d\d:\d\d(?::\d\d)?)(\.\d+)?)?(Z|[+-]\d\d:?\d\d)?", iso)
    if match:
        clock = match[2] or "00:00:00"
        clock = clock if clock.count(":") == 2 else clock + ":00"
        parsed = time.strptime(f"{match[1]}T{clock}", "%Y-%m-%dT%H:%M:%S")
        zone = match[4]
        seconds = calendar.timegm(parsed) if zone else int(time.mktime(parsed))  # no zone: local, as docker
        if zone and zone != "Z":
            sign = 1 if zone[0] == "+" else -1
            digits = zone[1:].replace(":", "")
            seconds -= sign * (int(digits[:2]) * 3600 + int(digits[2:]) * 60)
        fraction = (match[3] or ".0")[1:10].ljust(9, "0")
        return seconds * 10**9 + int(fraction)
    raise UsageError(f'invalid time "{text}": use a duration (10m, 1h30m), an RFC 3339 time '
                     "(2024-05-01T12:00:00Z) or a Unix timestamp")


def _lines_between(f: BinaryIO, start: int, end: int) -> Iterator[bytes]:
    """The lines of ``f`` from ``start`` to ``end`` (a line boundary), block by block."""
    f.seek(start)
    pos, carry = start, b""
    while pos < end:
        block = f.read(min(4 * READ_BLOCK, end - pos))
        if not block:
            break
        pos += len(block)
        parts = (carry + block).split(b"\n")
        carry = parts.pop()
        yield from (p for p in parts if p)
    if carry:
        yield carry


def read_log(path: Path, *, tail: int | None = None, follow: bool = False, since: int | None = None,
             until: int | None = None, still_running: Callable[[], bool] = lambda: False) -> Iterator[LogEntry]:
    """The log's entries, oldest first: the last ``tail`` ones (None: all), those at or after
    ``since`` and not after ``until`` (ns since the epoch); with ``follow``, then what is
    written until the container has ended (and the log is drained) or ``until`` has passed.

    Only reads: a full disk, a log being rotated or written meanwhile are all fine."""
    opened: list[BinaryIO] = []
    current: BinaryIO | None = None  # the newest file, followed from ``offset``
    offset = 0
    try:
        # What is there now, newest file first: a whole file for each, or the tail's lines.
        segments: list[Iterator[bytes]] = []
        needed = tail
        try:  # the newest file is followed from its end, whatever the tail takes (even none)
            current = path.open("rb")
            opened.append(current)
            offset = _complete_end(current)
        except OSError:
            current = None  # no log yet
        for file_path in reversed(log_files(path)):
            if needed is not None and needed <= 0:
                break
            if file_path == path:
                if current is None:
                    continue
                f, end = current, offset
            else:
                try:
                    f = file_path.open("rb")
                except OSError:
                    continue  # rotated away meanwhile
                opened.append(f)
                end = _complete_end(f)
            if needed is None:
                segments.insert(0, _lines_between(f, 0, end))
            else:
                lines = _last_lines(f, end, needed)
                segments.insert(0, iter(lines))
                needed -= len(lines)
        for segment in segments:
            for line in segment:
                verdict = _filter(line, since, until)
                if verdict is None:
                    return
                if verdict is not False:
                    yield verdict
        # Then what comes: from where the newest file ended, across rotations.
        while follow:
            if until is not None and time.time_ns() > until:
                return
            running = still_running()  # before reading: what it wrote before ending is read below
            if current is None:
                try:
                    current, offset = path.open("rb"), 0
                    opened.append(current)
                except OSError:
                    if not running:
                        return
                    time.sleep(POLL_S)
                    continue
            size = os.fstat(current.fileno()).st_size
            if size > offset:
                current.seek(offset)
                chunk = current.read(min(size - offset, FOLLOW_READ))
                cut = chunk.rfind(b"\n") + 1  # a line being written is read next time
                for line in chunk[:cut].split(b"\n"):
                    verdict = _filter(line, since, until) if line else False
                    if verdict is None:
                        return
                    if verdict is not False:
                        yield verdict
                offset += cut
                if cut:
                    continue
            try:
                now, mine = path.stat(), os.fstat(current.fileno())
                rotated = (now.st_ino, now.st_dev) != (mine.st_ino, mine.st_dev)
            except OSError:
                rotated = False
            if rotated:  # the old file is drained: on with the ones rotated after it, then the new one
                for missed in _rotated_after(path, mine):
                    for line in _lines_between(missed, 0, _complete_end(missed)):
                        verdict = _filter(line, since, until)
                        if verdict is None:
                            return
                        if verdict is not False:
                            yield verdict
                    missed.close()
                current, offset = None, 0
                continue
            if size < offset:  # truncated (max-file=1)
                offset = 0
                continue
            if not running:
                return  # the container has ended and everything it wrote was read
            time.sleep(POLL_S)
    finally:
        for f in opened:
            f.close()


def _rotated_after(path: Path, mine: os.stat_result) -> list[BinaryIO]:
    """Rotated files newer than the one ``mine`` describes (a fast writer can rotate more than
    once between two polls of a follower), opened, oldest first."""
    found, missed = False, []
    for rotated in log_files(path)[:-1]:
        try:
            f = rotated.open("rb")
        except OSError:
            continue
        st = os.fstat(f.fileno())
        if found:
            missed.append(f)
            continue
        found = (st.st_ino, st.st_dev) == (mine.st_ino, mine.st_dev)
        f.close()
    return missed


def _filter(line: bytes, since: int | None, until: int | None) -> LogEntry | bool | None:
    """The entry of ``line`` if it is to be shown, False to skip it, None: past ``until``, stop."""
    entry = _decode(line)
    if entry is None:
        return False
    if since is None and until is None:
        return entry
    when = entry_time_ns(entry.time)
    if when is None:
        return entry
    if until is not None and when > until:
        return None
    return entry if since is None or when >= since else False
