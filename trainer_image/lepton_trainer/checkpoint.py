"""Checkpoint files: atomic, checksummed, fenced by generation, read with agreed fallback.

Layout of a job's directory (``LEPTON_CHECKPOINT_DIR``, shared by all its workers):

- ``ckpt-g<generation>-s<step>.ckpt``: a checkpoint. The numbers are zero-padded for
  people, but parsed as numbers, so ordering never depends on their width. Order is
  ``(generation, step)``: the newest checkpoint is the highest step of the highest
  generation, even if an older generation reached a higher step.
- ``claim-g<generation>``: written by rank 0 when a generation starts, before it loads.
- ``ckpt-<step>.pt``: format 1 (a bare ``torch.save``, no generation), still read as
  generation -1, i.e. older than any format-2 checkpoint; nothing writes it any more.

A format-2 file is ``MAGIC``, one JSON header line (format, generation, step, size and
sha256 of the payload) and the payload, a ``torch.save`` of the state dict. It is written
to a temp file, fsync'd, renamed over its final name (atomic within a filesystem) and the
directory fsync'd, so a reader sees a complete file or none.

Fencing: the generation is a fencing token. A writer whose generation is below the
highest generation in the directory (checkpoint or claim) raises ``StaleGeneration``
instead of writing or pruning: a worker of an old generation that is still alive after a
partition cannot touch the state of the generation that replaced it. Claims make that
true from the new generation's start, not only from its first checkpoint.

Reading: a file proven damaged (bad magic, truncated, checksum mismatch, wrong contents)
is moved aside as ``*.corrupt`` by the leader. An I/O error is not proof: transient ones
(EIO, ESTALE, ...) are retried with a short backoff, and a file that still cannot be read
is left where it is and skipped for this start only.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

FORMAT = 2
MAGIC = b"LEPTON-CKPT\n"
LEGACY_GENERATION = -1  # format-1 files: older than every generation that writes format 2
REQUIRED_KEYS = ("step", "data_position", "synthetic")

_NAME = re.compile(r"^ckpt-g(\d+)-s(\d+)\.ckpt$")
_LEGACY_NAME = re.compile(r"^ckpt-(\d+)\.pt$")  # any width: the old 8 digits overflowed at 10^8
_CLAIM = re.compile(r"^claim-g(\d+)$")
_TMP_PREFIX = ".tmp-"
RETRY_DELAYS = (0.5, 1.0, 2.0)  # seconds between read attempts of one file
_STALE_TMP_SECONDS = 3600  # a temp file untouched this long is a dead writer's, whatever its host

TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.ESTALE,
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.EINTR,
        errno.EBUSY,
        errno.ENOLCK,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.ENETUNREACH,
        errno.EHOSTUNREACH,
    }
)
"""OSError errnos that a shared filesystem returns while it recovers: retry, never judge."""


class StaleGeneration(Exception):
    """A newer generation owns the directory: this writer must stop, without writing."""


class CorruptCheckpoint(ValueError):
    """The file is proven damaged (its own bytes say so), not merely unreadable right now."""


class UnreadableCheckpoints(Exception):
    """Checkpoints exist but none could be read (I/O errors): starting fresh would bury them."""


@dataclass(frozen=True, order=True)
class Entry:
    """One checkpoint file; entries sort by (generation, step)."""

    generation: int
    step: int
    path: Path = field(compare=False)


def _log(**fields) -> None:
    print(" ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


def _read_bytes(path: Path) -> bytes:
    # One function so that tests can make it fail with errors they cannot cause for real.
    with open(path, "rb") as f:
        return f.read()


def _same(values: list[int]) -> list[int]:
    return values


class CheckpointStore:
    """Saves and finds the checkpoints of one job, as a writer of one generation."""

    def __init__(
        self,
        directory: str | os.PathLike,
        keep: int = 3,
        generation: int = 0,
        retry_delays: tuple[float, ...] | None = None,
    ):
        self.dir = Path(directory)
        self.keep = keep
        self.generation = generation
        self.retry_delays = RETRY_DELAYS if retry_delays is None else retry_delays

    # ----- names -------------------------------------------------------------------

    def path_for(self, generation: int, step: int) -> Path:
        if generation == LEGACY_GENERATION:
            return self.dir / f"ckpt-{step:08d}.pt"
        return self.dir / f"ckpt-g{generation:04d}-s{step:09d}.ckpt"

    def _scan(self) -> tuple[list[Entry], list[tuple[int, Path]], list[Path]]:
        """(checkpoints newest first, claims, temp files), from one directory listing."""
        entries, claims, temps = [], [], []
        if not self.dir.is_dir():
            return entries, claims, temps
        for path in self.dir.iterdir():
            if match := _NAME.match(path.name):
                entries.append(Entry(int(match.group(1)), int(match.group(2)), path))
            elif match := _LEGACY_NAME.match(path.name):
                entries.append(Entry(LEGACY_GENERATION, int(match.group(1)), path))
            elif match := _CLAIM.match(path.name):
                claims.append((int(match.group(1)), path))
            elif path.name.startswith(_TMP_PREFIX):
                temps.append(path)
        return sorted(entries, reverse=True), claims, temps

    def entries(self) -> list[Entry]:
        """Checkpoint files, newest (generation, step) first; temp files excluded."""
        return self._scan()[0]

    def list(self) -> list[tuple[int, Path]]:
        """(step, path) of every checkpoint, newest first."""
        return [(e.step, e.path) for e in self.entries()]

    def highest_generation(self) -> int:
        """The highest generation that wrote a checkpoint or claimed the directory."""
        entries, claims, _ = self._scan()
        return max([LEGACY_GENERATION] + [e.generation for e in entries] + [g for g, _ in claims])

    # ----- writing -----------------------------------------------------------------

    def check_fence(self) -> None:
        """Raise StaleGeneration if a newer generation has claimed or written here."""
        newest = self.highest_generation()
        if newest > self.generation:
            raise StaleGeneration(f"generation {newest} owns {self.dir}; this writer is generation {self.generation}")

    def claim(self) -> None:
        """Announce this generation (rank 0, on start): older writers stop from now on.

        Creates the directory if needed (``mkdir -p``: safe when several processes race).
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self.check_fence()
        claim = self.dir / f"claim-g{self.generation:04d}"
        claim.touch()
        _fsync_dir(self.dir)

    def save(self, state: dict) -> Path:
        """Write ``state`` (which has a ``step``) atomically; prune to the last K.

        Raises StaleGeneration, before writing anything visible, if a newer generation
        owns the directory.
        """
        self.dir.mkdir(parents=True, exist_ok=True)
        self.check_fence()
        step = int(state["step"])
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        header = {
            "format": FORMAT,
            "generation": self.generation,
            "step": step,
            "size": len(payload),
            "sha256": hashlib.sha256(payload).hexdigest(),
        }
        final = self.path_for(self.generation, step)
        tmp = self.dir / f"{_TMP_PREFIX}{final.name}-{socket.gethostname()}-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                f.write(MAGIC + json.dumps(header, sort_keys=True).encode() + b"\n")
                f.write(payload)
                f.flush()
                os.fsync(f.fileno())
            # Again: a long write leaves time for a new generation to claim the directory.
            self.check_fence()
            os.replace(tmp, final)
        finally:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
        _fsync_dir(self.dir)
        self.prune()
        return final

    def prune(self) -> None:
        """Keep the newest K checkpoints by (generation, step); drop older claims and dead
        writers' temp files. Fenced like a write: a stale writer must not delete what a
        newer generation may be loading."""
        self.check_fence()
        entries, claims, temps = self._scan()
        for entry in entries[self.keep :]:
            entry.path.unlink(missing_ok=True)
        for generation, path in claims:
            if generation < self.generation:
                path.unlink(missing_ok=True)
        for path in temps:
            if _dead_writer(path):
                path.unlink(missing_ok=True)

    # ----- reading -----------------------------------------------------------------

    def read(self, entry: Entry) -> dict:
        """Load and verify one checkpoint.

        Raises CorruptCheckpoint if the file is proven damaged, OSError if it cannot be
        read (transient errors are retried first). Loads with ``weights_only=True``: a
        checkpoint file cannot run code.
        """
        for delay in (*self.retry_delays, None):
            try:
                data = _read_bytes(entry.path)
                break
            except OSError as exc:
                if exc.errno not in TRANSIENT_ERRNOS or delay is None:
                    raise
                _log(event="checkpoint_read_retry", path=entry.path, error=errno.errorcode.get(exc.errno), delay=delay)
                time.sleep(delay)
        return _decode(data, entry)

    def load_newest(
        self,
        leader: bool = True,
        broadcast: Callable[[list[int]], list[int]] = _same,
        any_rank: Callable[[list[int]], list[int]] = _same,
    ) -> tuple[Entry | None, dict | None]:
        """The newest checkpoint that every rank reads completely: (entry, state), or
        (None, None) when there is none.

        Every rank calls this at once. The leader (rank 0) proposes candidates newest
        first through ``broadcast`` (rank 0's values to all); every rank reads the
        proposal and ``any_rank`` (an element-wise max over ranks) tells all whether some
        rank failed, in which case the leader proposes the next older one. So all ranks
        take the same checkpoint, and the same fallback rules hold on every rank. Only the
        leader moves a file aside, and only one it proved corrupt itself.

        Raises UnreadableCheckpoints if candidates were left unread because of I/O errors
        and no older one could be loaded: a fresh start would write checkpoints that rank
        above them.
        """
        candidates = self.entries() if leader else []  # others follow the leader's proposals
        unreadable = False
        while True:
            proposal = [1, candidates[0].generation, candidates[0].step] if candidates else [0, 0, 0]
            has, generation, step = broadcast(proposal)
            if not has:
                break
            candidates = candidates[1:]
            entry = Entry(generation, step, self.path_for(generation, step))
            state, corrupt, io_error = None, False, False
            try:
                state = self.read(entry)
            except CorruptCheckpoint as exc:
                corrupt = True
                reason = f"corrupt: {exc}"
            except FileNotFoundError:
                reason = "gone"  # pruned or moved aside since the listing: nothing to bury
            except OSError as exc:
                io_error = True
                reason = f"{type(exc).__name__}: {exc}"
            failed, io_failed = any_rank([int(state is None), int(io_error)])
            if not failed:
                return entry, state
            unreadable = unreadable or bool(io_failed)
            if state is None:
                moved_to = "-"
                if corrupt and leader:
                    # Kept for diagnosis, but out of the way: it neither shadows newer saves
                    # nor takes one of the K slots.
                    moved_to = entry.path.with_name(entry.path.name + ".corrupt")
                    with contextlib.suppress(OSError):
                        os.replace(entry.path, moved_to)
                _log(event="checkpoint_skipped", path=entry.path, reason=repr(reason[:200]), moved_to=moved_to)
        if unreadable:
            raise UnreadableCheckpoints(f"no checkpoint in {self.dir} could be read; unreadable ones were kept")
        return None, None

    def latest_valid(self) -> tuple[Path | None, dict | None]:
        """Single-process ``load_newest``: (path, state) or (None, None)."""
        entry, state = self.load_newest()
        return (entry.path if entry else None), state


def _decode(data: bytes, entry: Entry) -> dict:
    """The state dict in ``data``, or CorruptCheckpoint saying what is wrong."""
    if entry.generation == LEGACY_GENERATION:
        state = _unpickle(data)
        if state.get("format") != 1:
            raise CorruptCheckpoint(f"format-1 name but format {state.get('format')!r}")
    else:
        if not data.startswith(MAGIC):
            raise CorruptCheckpoint("truncated before the header" if len(data) < len(MAGIC) else "bad magic")
        end = data.find(b"\n", len(MAGIC))
        if end < 0:
            raise CorruptCheckpoint("truncated in the header")
        try:
            header = json.loads(data[len(MAGIC) : end])
            size, digest = int(header["size"]), str(header["sha256"])
        except (ValueError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint(f"bad header: {exc}") from None
        if header.get("format") != FORMAT:
            # A newer trainer's file, not damage: kept and skipped like an unreadable one.
            raise OSError(errno.EPROTO, f"unsupported checkpoint format {header.get('format')!r}", str(entry.path))
        payload = memoryview(data)[end + 1 :]
        if len(payload) != size:
            raise CorruptCheckpoint(f"truncated: {len(payload)} of {size} payload bytes")
        if hashlib.sha256(payload).hexdigest() != digest:
            raise CorruptCheckpoint("sha256 mismatch")
        if (header.get("generation"), header.get("step")) != (entry.generation, entry.step):
            raise CorruptCheckpoint(f"header says g{header.get('generation')} s{header.get('step')}")
        state = _unpickle(payload)
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CorruptCheckpoint(f"missing keys {missing}")
    if state["step"] != entry.step:
        raise CorruptCheckpoint(f"state says step {state['step']}")
    return state


def _unpickle(data) -> dict:
    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged zip or pickle raises anything
        first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise CorruptCheckpoint(f"{type(exc).__name__}: {first_line}") from None
    if not isinstance(state, dict):
        raise CorruptCheckpoint(f"a {type(state).__name__}, not a dict")
    return state


def _fsync_dir(directory: Path) -> None:
    # A rename or a new file is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _dead_writer(tmp: Path) -> bool:
    """Is this temp file left by a writer that died? Sure only for this host's pids (pods
    of other hosts share the volume); otherwise only once it is old."""
    rest, _, pid = tmp.name.rpartition("-")
    if rest.endswith("-" + socket.gethostname()) and pid.isdigit() and int(pid) != os.getpid():
        return not _alive(int(pid))
    try:
        return time.time() - tmp.stat().st_mtime > _STALE_TMP_SECONDS
    except FileNotFoundError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CheckpointTimer:
    """Decides when the periodic checkpoint is due: every N steps or T seconds."""

    def __init__(self, every_steps: int, every_seconds: float, clock=time.monotonic):
        self.every_steps = every_steps
        self.every_seconds = every_seconds
        self._clock = clock
        self._last = clock()

    def due(self, step: int) -> bool:
        if self.every_steps > 0 and step % self.every_steps == 0:
            return True
        return self.every_seconds > 0 and self._clock() - self._last >= self.every_seconds

    def reset(self) -> None:
        self._last = self._clock()
