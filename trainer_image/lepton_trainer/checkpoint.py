"""Checkpoint files: atomic writes, keep the last K, skip partial or corrupt ones.

Layout: ``<dir>/ckpt-<step, 8 digits>.pt``, each a ``torch.save`` of a dict. A write goes
to a temp file in the same directory, is fsync'd, renamed over its final name (rename is
atomic within a filesystem) and the directory is fsync'd; so a reader sees a complete
file or none. Files can still be damaged (a crash of a non-POSIX network filesystem, a
disk error, a hand copy): the loader tries the newest first and falls back to older ones,
logging why it skipped each.

The directory must be shared by all workers (the operator mounts one volume): rank 0
writes, and every rank loads the checkpoint rank 0 chose.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

import torch

FORMAT = 1
_NAME = re.compile(r"^ckpt-(\d{8})\.pt$")
_TMP_PREFIX = ".tmp-ckpt-"
REQUIRED_KEYS = ("format", "step", "data_position", "synthetic")


def _log(**fields) -> None:
    print(" ".join(f"{k}={v}" for k, v in fields.items()), flush=True)


class CheckpointStore:
    """Saves and finds checkpoints in one directory."""

    def __init__(self, directory: str | os.PathLike, keep: int = 3):
        self.dir = Path(directory)
        self.keep = keep

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt-{step:08d}.pt"

    def list(self) -> list[tuple[int, Path]]:
        """Complete-looking checkpoint files, newest step first (temp files excluded)."""
        if not self.dir.is_dir():
            return []
        found = []
        for entry in self.dir.iterdir():
            match = _NAME.match(entry.name)
            if match:
                found.append((int(match.group(1)), entry))
        return sorted(found, reverse=True)

    def save(self, state: dict) -> Path:
        """Write ``state`` (which has a ``step``) atomically; prune to the last K."""
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.path_for(state["step"])
        tmp = self.dir / f"{_TMP_PREFIX}{state['step']:08d}-{os.getpid()}"
        try:
            with open(tmp, "wb") as f:
                torch.save(state, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            if tmp.exists():
                tmp.unlink()
        _fsync_dir(self.dir)
        self.prune()
        return final

    def prune(self) -> None:
        """Delete all but the newest K checkpoints, and temp files of dead writers."""
        for _, path in self.list()[self.keep :]:
            path.unlink(missing_ok=True)
        for entry in self.dir.glob(_TMP_PREFIX + "*"):
            pid = entry.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
                entry.unlink(missing_ok=True)

    def latest_valid(self) -> tuple[Path | None, dict | None]:
        """Load the newest checkpoint that reads back completely; (None, None) if none.

        Damaged files are renamed to ``*.corrupt`` (call this from the writer, rank 0).

        Loads with ``weights_only=True``: a checkpoint file cannot run code.
        """
        for step, path in self.list():
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
                missing = [k for k in REQUIRED_KEYS if k not in state]
                if missing:
                    raise ValueError(f"missing keys {missing}")
                if state["format"] != FORMAT or state["step"] != step:
                    raise ValueError(f"format {state['format']} step {state['step']}")
            except Exception as exc:  # any damage: truncated zip, unpickling, bad fields
                first_line = str(exc).splitlines()[0][:200] if str(exc) else ""
                reason = f"{type(exc).__name__}: {first_line}"
                # Move it aside (kept for diagnosis) so it neither shadows newer saves
                # nor takes one of the K slots.
                aside = path.with_name(path.name + ".corrupt")
                with contextlib.suppress(OSError):
                    os.replace(path, aside)
                _log(event="checkpoint_skipped", path=path, reason=repr(reason), moved_to=aside)
                continue
            return path, state
        return None, None


def load(path: str | os.PathLike) -> dict:
    """Load one checkpoint file (used by non-zero ranks after rank 0 chose it)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _fsync_dir(directory: Path) -> None:
    # The rename is only durable once the directory entry is on disk.
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
