"""Run folders: a fresh one per run (:func:`fresh_run_dir`) and exclusive use of one while a run
writes into it (:class:`RunDir`, a lock file holding the writer's process id)."""
from __future__ import annotations

import os
import time
from pathlib import Path


LOCK_NAME = ".medchain-run.lock"


def fresh_run_dir(base: str | Path = "results/simulate") -> Path:
    """A new, not yet existing folder ``base/run-YYYYmmdd-HHMMSS[-k]`` for one run."""
    base = Path(base)
    stamp = time.strftime("run-%Y%m%d-%H%M%S")
    path, k = base / stamp, 1
    while path.exists():
        k += 1
        path = base / f"{stamp}-{k}"
    return path


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunDir:
    """Exclusive use of an output folder by one run: created if missing, refused if it already
    holds anything (a new run's metrics would mix with an old run's), and locked by a lock file
    (created atomically, holding this process id) while the run writes; the lock is removed on exit.
    A second run into the same folder is refused with a message naming the holder."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.lock = self.path / LOCK_NAME

    def __enter__(self) -> Path:
        if self.path.exists() and not self.path.is_dir():
            raise ValueError(f"--out {self.path} is a file, not a folder")
        self.path.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(self.lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = int(self.lock.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                holder = None
            if holder is not None and _pid_alive(holder):
                raise RuntimeError(f"{self.path} is in use by another run (process {holder} holds "
                                   f"{self.lock}); wait for it to finish or choose another --out") from None
            raise RuntimeError(f"{self.path} holds a lock left by a run that is no longer running "
                               f"({self.lock}); its results may be incomplete: choose another --out, or "
                               "delete that folder if you do not need it") from None
        with os.fdopen(fd, "w") as f:
            f.write(f"{os.getpid()} {time.strftime('%Y-%m-%dT%H:%M:%S')}\n")
        others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_NAME)
        if others:
            self.lock.unlink()
            shown = ", ".join(others[:4]) + (", …" if len(others) > 4 else "")
            raise RuntimeError(f"--out {self.path} is not empty ({shown}): one folder holds one run, and a "
                               "new run would mix its metrics with the old ones. Choose a new --out, or "
                               "omit --out for a fresh folder under results/simulate/")
        return self.path

    def __exit__(self, *exc) -> None:
        try:
            self.lock.unlink()
        except FileNotFoundError:
            pass
