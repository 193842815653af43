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


def stop_tree(roots: list[psutil.Process]) -> None:
    """Terminates `roots` and all their descendants; kills what is left after GRACE_S."""
    procs = {}
    for root in roots:
        try:
            for p in [root, *root.children(recursive=True)]:
                procs[p.pid] = p
        except psutil.Error:
            continue
    for p in procs.values():
        try:
            p.terminate()
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(list(procs.values()), timeout=GRACE_S)
    for p in alive:
        try:
            p.kill()
        except psutil.Error:
            pass


def main(argv: list[str]) -> int:
    driver_pid, ray_pids = int(argv[0]), [int(a) for a in argv[1:]]
    roots = []
    for pid in ray_pids:
        try:
            roots.append(psutil.Process(pid))   # create_time pins the process: a reused PID is not it
        except psutil.Error:
            pass
    while alive(driver_pid):
        time.sleep(POLL_S)
    stop_tree([r for r in roots if r.is_running()])
    return 0


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
