"""A prompt cache beyond the slots: saved KV states of sequences, found by the tokens they hold.

When a slot's cache must make way for another conversation, the engine saves the sequence's
state here first; a later prompt that begins with those tokens restores it instead of decoding
it again. Two tiers: host RAM, bounded in bytes, least recently used first; and, optionally, a
folder on disk that outlives the server, bounded too. A state is restored only into an
instance whose ``key`` (the model file and the load options that shape the KV) is the one it
was saved under. Thread-safe: engines' threads and the disk writer share one cache.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import queue
import struct
import threading
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmscli.engine.slots import common_prefix

log = logging.getLogger("lmscli.promptcache")
State = bytes | bytearray  # a bytearray that llama.cpp wrote into is kept as it is: no copy

MAGIC = b"LMSKV1\n"
SUFFIX = ".lmskv"
DEFAULT_DISK_BYTES = 4 * 2**30
QUEUE_BYTES = 256 * 2**20  # states waiting for the disk, at least (else: the RAM bound)
_HEAD = struct.Struct("<I")  # length of the JSON header that follows the magic


@dataclass(eq=False)
class Entry:
    key: str
    tokens: array  # 'i': the tokens whose KV the state holds, from position 0
    size: int  # bytes of state
    crc: int | None = None  # of tokens and state, once written to disk (by the writer)
    data: State | None = None  # in RAM
    path: Path | None = None  # on disk
    used: int = 0  # recency: a larger number was used later
    pending: State | None = None  # queued for the disk: readable, and listed, until written


@dataclass
class Hit:
    entry: Entry
    prefix: int  # tokens of the prompt the entry holds


class PromptCache:
    """Saved sequence states in RAM (``ram_bytes``) and on disk (``disk_dir``, ``disk_bytes``);
    a bound of 0 turns that tier off."""

    def __init__(self, ram_bytes: int, disk_dir: Path | None = None,
                 disk_bytes: int = 0) -> None:
        self.ram_limit = max(0, ram_bytes)
        self.disk_limit = max(0, disk_bytes) if disk_dir is not None else 0
        self.disk_dir = disk_dir if self.disk_limit else None
        self._entries: list[Entry] = []
        self._lock = threading.Lock()
        self._clock = 0
        self._counts: dict[str, Counter[str]] = {}  # hits, misses, saves, restoredTokens
        self._writes: queue.Queue[tuple[Entry, State]] = queue.Queue()
        self._writer: threading.Thread | None = None
        if self.disk_dir is not None:
            self._scan()

    @property
    def enabled(self) -> bool:
        return bool(self.ram_limit or self.disk_limit)

    # -- finding ---------------------------------------------------------------------------

    def lookup(self, key: str, prompt: Sequence[int]) -> Hit | None:
        """The entry that holds the longest prefix of ``prompt``, if any holds one."""
        wanted = array("i", prompt)
        with self._lock:
            best: Hit | None = None
            for entry in self._entries:
                if entry.key != key:
                    continue
                n = common_prefix(entry.tokens, wanted)
                if n and (best is None or n > best.prefix):
                    best = Hit(entry, n)
            if best is not None:  # the next save must not push it out before it is read
                self._touch(best.entry)
            return best

    def covers(self, key: str, tokens: Sequence[int]) -> bool:
        """Whether an entry already holds all of ``tokens`` (it is then the most recent)."""
        wanted = array("i", tokens)
        with self._lock:
            for entry in self._entries:
                if entry.key == key and len(entry.tokens) >= len(wanted) \
                        and entry.tokens[:len(wanted)] == wanted:
                    self._touch(entry)
                    return True
        return False

    def load(self, hit: Hit) -> State | None:
        """The entry's state, from RAM or disk; None when it cannot be read (it is then
        dropped, with a log line)."""
        entry = hit.entry
        with self._lock:
            self._touch(entry)
            data = entry.data if entry.data is not None else entry.pending
            path = entry.path
        if data is None and path is not None:
            data = self._read(entry, path)
            if data is not None and self.ram_limit >= entry.size:
                with self._lock:
                    entry.data = data
                    self._bound_ram()
        if data is None:
            self.discard(entry)
        return data

    def restored(self, key: str, tokens: int) -> None:
        self._count(key, hits=1, restoredTokens=tokens)

    def missed(self, key: str) -> None:
        self._count(key, misses=1)

    def _count(self, key: str, **amounts: int) -> None:
        with self._lock:
            self._counts.setdefault(key, Counter()).update(amounts)

    # -- keeping ---------------------------------------------------------------------------

    def save(self, key: str, tokens: Sequence[int], data: State) -> None:
        """Keep a state that holds ``tokens``; entries it makes redundant (their tokens a
        prefix of these) go. It goes to the disk when it leaves RAM, or on ``persist``: a
        write while a prompt is decoded would slow the decode down (on a CPU, it takes a core).
        """
        entry = Entry(key, array("i", tokens), len(data))
        with self._lock:
            for old in [e for e in self._entries if e.key == key
                        and len(e.tokens) <= len(entry.tokens)
                        and e.tokens == entry.tokens[:len(e.tokens)]]:
                self._drop(old)
            self._counts.setdefault(key, Counter())["saves"] += 1
            self._touch(entry)
            self._entries.append(entry)
            if self.ram_limit >= entry.size:
                entry.data = data
                self._bound_ram()
            else:
                self._write_back(entry, data)

    def persist(self, key: str) -> None:
        """Queue what RAM holds for ``key`` for the disk, the most recently used first
        (``written`` waits for it)."""
        with self._lock:
            for entry in sorted(self._entries, key=lambda e: -e.used):
                if entry.key == key and entry.data is not None:
                    self._write_back(entry, entry.data)

    def written(self, within_s: float) -> bool:
        """Wait until every queued state is on disk, at most ``within_s``."""
        deadline = time.monotonic() + within_s
        done = self._writes.all_tasks_done
        with done:
            while self._writes.unfinished_tasks:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                done.wait(left)
        return True

    def release(self, nbytes: int) -> int:
        """Free at least ``nbytes`` of RAM (least recently used first), for a model that
        needs the memory more; returns the bytes freed."""
        with self._lock:
            before = sum(e.size for e in self._entries if e.data is not None)
            limit, self.ram_limit = self.ram_limit, max(0, before - nbytes)
            self._bound_ram(to_disk=False)  # a write would hold the memory a while longer
            self.ram_limit = limit
            return before - sum(e.size for e in self._entries if e.data is not None)

    def discard(self, entry: Entry) -> None:
        with self._lock:
            self._drop(entry)

    def stats(self, key: str | None = None) -> dict[str, Any]:
        """Sizes and counts: the whole cache's, or only what was saved under ``key``."""
        with self._lock:
            entries = [e for e in self._entries if key is None or e.key == key]
            counts: Counter[str] = Counter()
            for k, c in self._counts.items():
                if key is None or k == key:
                    counts.update(c)
            out: dict[str, Any] = {
                "entries": len(entries),
                "ramBytes": sum(e.size for e in entries if e.data is not None),
                "diskBytes": sum(e.size for e in entries if e.path is not None),
                **{name: counts[name] for name in ("hits", "misses", "saves",
                                                   "restoredTokens")}}
            if key is None:
                out |= {"ramLimitBytes": self.ram_limit, "diskLimitBytes": self.disk_limit,
                        "diskDir": str(self.disk_dir) if self.disk_dir else None}
            return out

    # -- inside (hold the lock) --------------------------------------------------------------

    def _touch(self, entry: Entry) -> None:
        self._clock += 1
        entry.used = self._clock

    def _drop(self, entry: Entry) -> None:
        entry.data = None
        if entry.path is not None:
            with contextlib.suppress(OSError):
                entry.path.unlink()
            entry.path = None
        if entry in self._entries:  # one being written is deleted when its write ends
            self._entries.remove(entry)

    def _forget_if_gone(self, entry: Entry) -> None:
        if entry.data is None and entry.path is None and entry.pending is None \
                and entry in self._entries:
            self._entries.remove(entry)

    def _bound_ram(self, to_disk: bool = True) -> None:
        in_ram = sorted((e for e in self._entries if e.data is not None), key=lambda e: e.used)
        total = sum(e.size for e in in_ram)
        while total > self.ram_limit and in_ram:
            oldest = in_ram.pop(0)
            total -= oldest.size
            if to_disk:
                self._write_back(oldest, oldest.data)
            oldest.data = None
            self._forget_if_gone(oldest)

    def _write_back(self, entry: Entry, data: State | None) -> None:
        """Queue the state for the disk, unless it is there already or does not fit; while
        queued it is still in memory, so the queue is bounded like RAM."""
        queued = sum(e.size for e in self._entries if e.pending is not None)
        if data is not None and entry.path is None and entry.pending is None \
                and self.disk_dir is not None and self.disk_limit >= entry.size \
                and queued + entry.size <= max(self.ram_limit, QUEUE_BYTES, entry.size):
            self._queue_write(entry, data)
        else:
            self._forget_if_gone(entry)

    def _bound_disk(self) -> None:
        on_disk = sorted((e for e in self._entries if e.path is not None), key=lambda e: e.used)
        total = sum(e.size for e in on_disk)
        while total > self.disk_limit and on_disk:
            oldest = on_disk.pop(0)
            total -= oldest.size
            assert oldest.path is not None
            with contextlib.suppress(OSError):
                oldest.path.unlink()
            oldest.path = None
            self._forget_if_gone(oldest)

    # -- disk --------------------------------------------------------------------------------

    def _queue_write(self, entry: Entry, data: State) -> None:
        entry.pending = data
        if self._writer is None:
            self._writer = threading.Thread(target=self._write_loop, name="prompt-cache",
                                            daemon=True)
            self._writer.start()
        self._writes.put((entry, data))

    def _write_loop(self) -> None:
        while True:
            entry, data = self._writes.get()
            try:
                self._write(entry, data)
            except Exception as exc:  # a full disk must not stop the server
                log.warning("Could not write to the prompt cache: %s", exc)
            finally:
                self._writes.task_done()

    def _write(self, entry: Entry, data: State) -> None:
        path: Path | None = None
        try:
            path = self._write_file(entry, data)
        finally:
            with self._lock:
                entry.pending = None
                if path is not None and entry in self._entries:
                    entry.path = path
                    self._bound_disk()
                elif path is not None:  # made redundant while it was being written
                    with contextlib.suppress(OSError):
                        path.unlink()
                else:
                    self._forget_if_gone(entry)

    def _write_file(self, entry: Entry, data: State) -> Path:
        assert self.disk_dir is not None
        entry.crc = checksum(entry.tokens, data)
        self.disk_dir.mkdir(parents=True, exist_ok=True)
        path = self.disk_dir / file_name(entry.key, entry.tokens)
        header = json.dumps({"key": entry.key, "tokens": len(entry.tokens),
                             "bytes": entry.size, "crc32": entry.crc}).encode()
        tmp = path.with_suffix(".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + _HEAD.pack(len(header)) + header)
                f.write(entry.tokens.tobytes())
                f.write(data)
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()
        return path

    def _scan(self) -> None:
        assert self.disk_dir is not None
        if not self.disk_dir.is_dir():
            return
        for tmp in self.disk_dir.glob("*.tmp"):  # a write that a killed server left
            with contextlib.suppress(OSError):
                tmp.unlink()
        for path in sorted(self.disk_dir.glob("*" + SUFFIX), key=_mtime):
            entry = read_header(path)
            if entry is None:
                continue
            self._touch(entry)
            self._entries.append(entry)
        self._bound_disk()

    def _read(self, entry: Entry, path: Path) -> State | None:
        try:
            with open(path, "rb") as f:
                f.seek(_data_offset(path, entry))
                data = bytearray(entry.size)
                got = f.readinto(data)
        except OSError as exc:
            log.warning("Skipped prompt cache file %s: %s", path.name, exc.strerror or exc)
            return None
        if got != entry.size or checksum(entry.tokens, data) != entry.crc:
            log.warning("Skipped prompt cache file %s: its contents are damaged", path.name)
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # recency survives a restart
        return data


def checksum(tokens: array, data: State) -> int:
    """Over the tokens too: a state restored under the wrong tokens would answer wrongly."""
    return zlib.crc32(data, zlib.crc32(tokens.tobytes()))


def file_name(key: str, tokens: array) -> str:
    digest = hashlib.sha256(key.encode() + b"\0" + tokens.tobytes()).hexdigest()
    return f"{hashlib.sha256(key.encode()).hexdigest()[:12]}-{digest[:24]}{SUFFIX}"


def read_header(path: Path) -> Entry | None:
    """The entry a cache file describes (tokens, not the state), or None with a log line
    when it is not a whole lmscli cache file."""
    try:
        with open(path, "rb") as f:
            if f.read(len(MAGIC)) != MAGIC:
                raise ValueError("not an lmscli prompt cache file")
            (length,) = _HEAD.unpack(f.read(_HEAD.size))
            if length > 1 << 16:
                raise ValueError("its header is damaged")
            head = json.loads(f.read(length))
            count, size, crc = int(head["tokens"]), int(head["bytes"]), int(head["crc32"])
            tokens = array("i")
            expected = len(MAGIC) + _HEAD.size + length + count * tokens.itemsize + size
            if count < 0 or size < 0 or os.path.getsize(path) != expected:
                raise ValueError("it is truncated")
            tokens.frombytes(f.read(count * tokens.itemsize))
            return Entry(str(head["key"]), tokens, size, crc, path=path)
    except Exception as exc:  # whatever is in the file, the server must start
        log.warning("Skipped prompt cache file %s: %s", path.name, exc)
        return None


def _data_offset(path: Path, entry: Entry) -> int:
    return os.path.getsize(path) - entry.size


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0


def parse_size(text: str) -> int:
    """``512M``, ``8G``, ``1.5GiB``, ``0`` or a plain number of bytes, as bytes."""
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    units = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    scale = units.get(raw[-1:], 1)
    number = raw[:-1] if raw[-1:] in units else raw
    try:
        value = float(number)
    except ValueError:
        raise ValueError(f"{text!r} is not a size: use a number with K, M or G, "
                         "like 4G, or 0 to turn it off") from None
    if value < 0 or value != value:
        raise ValueError(f"{text!r} is not a size: it must be 0 or more")
    return int(value * scale)


def default_ram_bytes() -> int:
    """An eighth of the machine's memory, at most 8 GiB (llama-server's own default)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 2**30
    return min(8 * 2**30, total // 8)
