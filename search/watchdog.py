"""Stops a local Ray instance once the driver that started it is gone, however it went.

    python search/watchdog.py DRIVER_PID RAY_PID [RAY_PID ...]

`ray.init()` on one machine starts the GCS, the raylet and their agents as the driver's
children. A driver that exits stops them itself; one killed with SIGKILL cannot, and they would
keep running. The driver starts this script (in its own session, so a Ctrl-C meant for the
driver does not reach it) with the PIDs of the Ray processes it started. When the driver's PID
disappears, every one of them and their descendants (the workers) get SIGTERM, then SIGKILL
after a grace period.
"""
from __future__ import annotations

import sys
import time

import psutil

POLL_S = 0.5
GRACE_S = 5.0


def descendants(roots: list[psutil.Process]) -> dict[int, psutil.Process]:
    """Returns the live processes among `roots` and all their descendants, by PID."""
    found = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        except psutil.Error:
            continue
    return found


def stop(procs: dict[int, psutil.Process]) -> None:
    """Terminates `procs`; kills what is left of them after GRACE_S."""
    live = [p for p in procs.values() if p.is_running()]   # is_running: the same process, not a reused PID
    for p in live:
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, left = psutil.wait_procs(live, timeout=GRACE_S)
    for p in left:
        try:
            p.kill()
        except psutil.Error:
            pass


def main(argv: list[str]) -> int:
    driver_pid, ray_pids = int(argv[0]), [int(a) for a in argv[1:]]
    roots = []
    for pid in ray_pids:
        try:
            roots.append(psutil.Process(pid))
        except psutil.Error:
            pass
    # Ray's processes are watched as they come (workers, agents): once the driver is gone, some
    # of them exit on their own and leave their children to init, out of reach of a tree walk.
    known: dict[int, psutil.Process] = {}
    while alive(driver_pid):
        known.update(descendants(roots))
        time.sleep(POLL_S)
    known.update(descendants(roots))
    stop(known)
    return 0


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
