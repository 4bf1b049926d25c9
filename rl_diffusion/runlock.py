"""One process per run directory: an exclusive lock on RUN/.lock, which names its holder (process id, host).

Taken when a run starts or resumes, held until the command ends. The operating system releases it when its
process dies, however it dies, so a run killed with SIGKILL is never left locked; the file stays, naming the
last holder. Under torchrun only rank 0 takes it: the ranks of one run share the directory by design.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from rl_diffusion.errors import UserError

LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """Hold `run_dir`'s lock for the duration of the block; a run held by another process is refused with a
    UserError naming that process."""
    if int(os.environ.get("RANK", "0")) > 0:  # a torchrun rank other than 0: rank 0 holds the run's lock
        yield
        return
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / LOCK_FILE
    with open(lock, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            try:
                holder = json.loads(f.read())
                who = f"process {holder['pid']} on {holder['host']}"
            except (ValueError, KeyError, TypeError):
                who = "another process"
            raise UserError(f"{run_dir} is in use by {who}; wait for it to end, or use another --out") from None
        f.seek(0)
        f.truncate()
        f.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        f.flush()
        try:
            yield
        finally:
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:  # refused before any work
                lock.unlink()
                run_dir.rmdir()
            fcntl.flock(f, fcntl.LOCK_UN)
