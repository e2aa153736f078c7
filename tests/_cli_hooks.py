"""Run the whylook CLI in this process with a hook at a chosen point (test helper).

``python -m _cli_hooks kill GLOB N PHASE -- ARGS...`` runs ``whylook ARGS`` and sends
itself SIGKILL at the N-th file written through ``whylook._io.atomic_write`` whose name
matches GLOB. PHASE says when:

- ``mid-write``: half of the file's bytes are in its temporary file;
- ``before-rename``: the temporary file is complete but not yet renamed into place;
- ``after-rename``: the file has just been renamed into place.

SIGKILL cannot be caught: no ``finally`` block, no atexit handler runs, exactly as when a
user's machine kills the process. Hooking the write itself (rather than killing from
outside after polling) makes the kill points exact, whatever the machine's load.

``python -m _cli_hooks pause READY GO -- ARGS...`` runs ``whylook ARGS`` and, once it holds
the run-folder lock, creates file READY and waits (up to 120 s) until file GO exists.
"""

from __future__ import annotations

import fcntl
import fnmatch
import io
import os
import signal
import sys
import time
from pathlib import Path


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def install_kill(glob: str, nth: int, phase: str) -> None:
    from whylook import _io

    if phase not in {"mid-write", "before-rename", "after-rename"}:
        raise SystemExit(f"unknown phase {phase!r}")
    real = _io.atomic_write
    seen = 0

    def atomic_write(path, write):  # type: ignore[no-untyped-def]
        nonlocal seen
        if not fnmatch.fnmatch(Path(path).name, glob):
            return real(path, write)
        seen += 1
        if seen != nth:
            return real(path, write)
        if phase == "after-rename":
            real(path, write)
            _kill()
        buf = io.BytesIO()
        write(buf)
        data = buf.getvalue()

        def partial(fh) -> None:  # type: ignore[no-untyped-def]
            fh.write(data[: len(data) // 2] if phase == "mid-write" else data)
            fh.flush()
            os.fsync(fh.fileno())
            _kill()

        return real(path, partial)

    # save_weights, save_npz and write_json look atomic_write up in _io's globals.
    _io.atomic_write = atomic_write


def install_pause(ready: str, go: str) -> None:
    real = fcntl.flock

    def flock(fd, operation):  # type: ignore[no-untyped-def]
        result = real(fd, operation)
        if operation & fcntl.LOCK_EX:
            Path(ready).touch()
            deadline = time.monotonic() + 120
            while not Path(go).exists() and time.monotonic() < deadline:
                time.sleep(0.02)
        return result

    fcntl.flock = flock


def main(argv: list[str]) -> int:
    split = argv.index("--")
    hook, cli_args = argv[:split], argv[split + 1 :]
    if hook[0] == "kill":
        install_kill(hook[1], int(hook[2]), hook[3])
    elif hook[0] == "pause":
        install_pause(hook[1], hook[2])
    else:
        raise SystemExit(f"unknown hook {hook[0]!r}")
    from whylook.cli import main as whylook_main

    return whylook_main(cli_args)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
