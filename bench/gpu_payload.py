#!/usr/bin/env python
"""Carry what bench/gpu_suite.py needs to a GPU machine that has torch but no network.

On a machine with PyPI access and this project installed (the versions the tests pass with):

    python bench/gpu_payload.py prepare --data-dir DIR     # wheels + trimmed data into .gpu-payload/

On the GPU machine (gpu_suite.py does the same first, so this is only for a carry that holds
nothing but wheels):

    python3 bench/gpu_payload.py install

`prepare` downloads, for a CPython 3.12 (`--python`) manylinux x86_64 target, the wheels of the packages the
search stage needs (Ray Tune, Optuna, MLflow, SQLAlchemy, Alembic) and of everything they
pull in, less what the GPU machine already has (torch, torchvision, numpy, pandas, scikit-learn,
matplotlib, pillow, psutil, pyyaml, requests and their own dependencies). Versions are pinned to
the ones installed here. The wheels go into one tar split into chunks, and the chunks and the
trimmed data are packed into carries `.gpu-payload/carry-1`, `carry-2`, ..., each at most
`--carry-mib`, since one transfer to the GPU machine is limited (the data goes in the first); it
prints the total and which carry goes with which command. `install` joins the chunks once all
have arrived (they stay in `.gpu-payload/received`), checks their sha256 and unpacks the wheels
into `.gpu-payload/site`, which gpu_suite.py puts on the path.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAYLOAD = os.path.join(REPO, ".gpu-payload")
SITE = "site"
MANIFEST = "payload.json"
# What the search stage needs (search/run.py, orchestrate.py, tracking.py with a sqlite store).
# MLflow itself, not only its client (mlflow-skinny): the champion records mlflow's version.
ROOTS = ("ray[tune]", "optuna", "cmaes", "mlflow", "sqlalchemy", "alembic")
# What the GPU machine ships with; these and their dependencies are not carried.
PREINSTALLED = ("torch", "torchvision", "numpy", "pandas", "scikit-learn", "matplotlib", "pillow",
                "psutil", "pyyaml", "requests")
# Required by the search and by a recent preinstalled package here (scikit-learn), but perhaps not
# by the GPU machine's older one: carried anyway (small, pure Python).
ALWAYS_CARRY = ("cloudpickle",)
# ID data, the auxiliary outliers RNA and Open-sampling train with, two test OOD sets.
DATA = ("cifar10.tar.gz", "tin_aux.tar.gz", "tin_ood.tar.gz", "textures_ood.tar.gz")
TARGET_PYTHON = "3.12"
TARGET_MARKERS = {"os_name": "posix", "sys_platform": "linux", "platform_system": "Linux",
                  "platform_machine": "x86_64", "implementation_name": "cpython",
                  "platform_python_implementation": "CPython"}
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64")
MIB = 2 ** 20


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(roots: tuple[str, ...], python: str = TARGET_PYTHON) -> dict[str, str]:
    """Returns {distribution: installed version} for `roots` ("name[extra]") and everything they
    require on the target (markers evaluated for CPython `python` on Linux x86_64)."""
    from packaging.requirements import Requirement

    found: dict[str, str] = {}
    todo = [Requirement(r) for r in roots]
    seen: set[tuple[str, frozenset]] = set()
    while todo:
        req = todo.pop()
        key = (canonical(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            dist = metadata.distribution(req.name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"error: {req.name} is required on the target but not installed here; "
                             f"install the project (pip install -e .) before `prepare`") from None
        found[canonical(req.name)] = dist.version
        for text in dist.requires or ():
            sub = Requirement(text)
            extras = req.extras or {""}
            env = {**TARGET_MARKERS, "python_version": python, "python_full_version": f"{python}.0"}
            if sub.marker is None or any(sub.marker.evaluate({**env, "extra": e}) for e in extras):
                todo.append(sub)
    return found


def sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(MIB), b""):
            h.update(block)
    return h.hexdigest()


def download(pins: dict[str, str], into: str, python: str = TARGET_PYTHON) -> list[str]:
    """Downloads one wheel per pin for the target; returns the file names."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--python-version", python, "--implementation", "cp", "--abi", f"cp{python.replace('.', '')}",
           "--abi", "abi3", "--abi", "none", *(f"--platform={p}" for p in PLATFORMS), "--platform=any", "-d", into,
           *(f"{name}=={version}" for name, version in sorted(pins.items()))]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: pip download failed: {last}")
    return sorted(f for f in os.listdir(into) if f.endswith(".whl"))


def pack(wheels_dir: str, data_dir: str, data_files: list[str], out: str, limit: int,
         pins: dict[str, str], python: str = TARGET_PYTHON) -> dict:
    """Packs `data_files` and the wheels in `wheels_dir` (one tar, split into chunks) into carries
    `out`/carry-1, carry-2, ..., each at most `limit` bytes; returns the manifest every carry holds.
    The data goes first, with as much of the tar as fits beside it: the first run on the GPU
    machine can measure everything but the search."""
    wheels = sorted(f for f in os.listdir(wheels_dir) if f.endswith(".whl"))
    data_bytes = sum(os.path.getsize(os.path.join(data_dir, f)) for f in data_files)
    if data_bytes > limit:
        raise ValueError(f"the data alone ({data_bytes / MIB:.1f} MiB) exceeds the carry limit "
                         f"({limit / MIB:.1f} MiB)")
    os.makedirs(os.path.join(out, "carry-1", "data"))
    for name in data_files:
        shutil.copy2(os.path.join(data_dir, name), os.path.join(out, "carry-1", "data"))
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        tar_path = os.path.join(tmp, "wheels.tar")
        with tarfile.open(tar_path, "w") as tar:   # wheels are already compressed
            for name in wheels:
                tar.add(os.path.join(wheels_dir, name), arcname=name)
        tar_bytes, tar_sha = os.path.getsize(tar_path), sha256(tar_path)
        chunks, carries, room = [], ["carry-1"], limit - data_bytes
        with open(tar_path, "rb") as f:
            remaining = tar_bytes
            while remaining:
                if room == 0:
                    carries.append(f"carry-{len(carries) + 1}")
                    os.makedirs(os.path.join(out, carries[-1]))
                    room = limit
                size = min(room, remaining)
                name = f"wheels.tar.{len(chunks):03d}"
                with open(os.path.join(out, carries[-1], name), "wb") as chunk:
                    chunk.write(f.read(size))
                chunks.append({"name": name, "bytes": size, "carry": carries[-1],
                               "sha256": sha256(os.path.join(out, carries[-1], name))})
                remaining, room = remaining - size, room - size
    manifest = {"python": python, "target": f"CPython {python}, " + ", ".join(PLATFORMS),
                "wheels": wheels, "pins": pins, "tar_bytes": tar_bytes, "tar_sha256": tar_sha,
                "chunks": chunks, "data": data_files, "data_bytes": data_bytes, "carries": carries}
    for carry in carries:
        with open(os.path.join(out, carry, MANIFEST), "w") as f:
            json.dump(manifest, f, indent=1)
    return manifest


def prepare(args: argparse.Namespace) -> None:
    if not args.data_dir or not os.path.isfile(os.path.join(args.data_dir, DATA[0])):
        raise SystemExit(f"error: --data-dir {args.data_dir}: expected a folder holding {', '.join(DATA)}")
    pins = closure(ROOTS, args.python)
    for name in closure(PREINSTALLED, args.python):
        if name not in ALWAYS_CARRY:
            pins.pop(name, None)
    if os.path.exists(args.out):
        shutil.rmtree(args.out)
    with tempfile.TemporaryDirectory() as wheels_dir:
        print(f"downloading {len(pins)} wheels for CPython {args.python} manylinux x86_64 ...", flush=True)
        wheels = download(pins, wheels_dir, args.python)
        biggest = sorted(((os.path.getsize(os.path.join(wheels_dir, w)), w) for w in wheels), reverse=True)[:3]
        data_files = [f for f in DATA if os.path.isfile(os.path.join(args.data_dir, f))]
        try:
            manifest = pack(wheels_dir, args.data_dir, data_files, args.out, int(args.carry_mib * MIB), pins,
                            args.python)
        except ValueError as e:
            raise SystemExit(f"error: {e}; raise --carry-mib") from None
    rel = os.path.relpath(args.out, REPO)
    print(f"biggest wheels: {', '.join(f'{w} {b / MIB:.1f} MiB' for b, w in biggest)}")
    print(f"wheels: {len(wheels)} files, {manifest['tar_bytes'] / MIB:.1f} MiB; data: {', '.join(data_files)}, "
          f"{manifest['data_bytes'] / MIB:.1f} MiB; total {(manifest['tar_bytes'] + manifest['data_bytes']) / MIB:.1f} "
          f"MiB in {len(manifest['carries'])} carries")
    last = len(manifest["carries"]) - 1
    for i, carry in enumerate(manifest["carries"]):
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(os.path.join(args.out, carry))
                   for f in files)
        command = ("python3 bench/gpu_suite.py --json gpu-suite.json   (all but the search)" if i == 0
                   else "python3 bench/gpu_suite.py --only smoke_search --json gpu-suite-search.json"
                   if i == last else "python3 bench/gpu_suite.py --install-only")
        print(f"  run {i + 1}: carry {rel}/{carry} ({size / MIB:.1f} MiB)  ->  {command}")


# -- on the GPU machine --------------------------------------------------------------------------
def install_wheel(path: str, site: str) -> None:
    """Unpacks one wheel into `site` as pip would for an importable package (scripts and headers
    are left out), keeping each file's permission bits (Ray's server binaries are executables)."""
    with zipfile.ZipFile(path) as whl:
        for info in whl.infolist():
            if info.is_dir():
                continue
            parts = info.filename.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue
                parts = parts[2:]
            dest = os.path.join(site, *parts)
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            with whl.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out)
            mode = info.external_attr >> 16
            if mode & 0o777:
                os.chmod(dest, (mode & 0o777) | 0o600)


def install(payload: str = PAYLOAD) -> str:
    """Installs the carried wheels into `payload`/site once every chunk has arrived; returns one
    line saying what it did or what is still missing. Raises RuntimeError on a corrupt chunk."""
    manifests = sorted(os.path.join(payload, d, MANIFEST) for d in os.listdir(payload)
                       if os.path.isfile(os.path.join(payload, d, MANIFEST))) if os.path.isdir(payload) else []
    if not manifests:
        return "no wheels carried (no .gpu-payload/carry-*/payload.json)"
    with open(manifests[-1]) as f:
        manifest = json.load(f)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest["python"] != here:
        return f"wheels not installed: they are for Python {manifest['python']}, this is {here}"
    site, received = os.path.join(payload, SITE), os.path.join(payload, "received")
    marker = os.path.join(site, "installed.json")
    if os.path.exists(marker):
        with open(marker) as f:
            if json.load(f).get("tar_sha256") == manifest["tar_sha256"]:
                return f"wheels already installed in {os.path.relpath(site, REPO)}"
    os.makedirs(received, exist_ok=True)
    missing = []
    for chunk in manifest["chunks"]:
        kept = os.path.join(received, chunk["name"])
        carried = os.path.join(payload, chunk["carry"], chunk["name"])
        if not (os.path.exists(kept) and sha256(kept) == chunk["sha256"]) and os.path.exists(carried):
            if sha256(carried) != chunk["sha256"]:
                raise RuntimeError(f"{chunk['carry']}/{chunk['name']}: sha256 differs from the manifest; "
                                   f"carry it again")
            shutil.copyfile(carried, kept)
        if not os.path.exists(kept):
            missing.append(chunk["carry"])
    if missing:
        return f"wheels not installed yet: still missing {', '.join(sorted(set(missing)))}"
    with tempfile.TemporaryDirectory(dir=payload) as tmp:
        joined = os.path.join(tmp, "wheels.tar")
        with open(joined, "wb") as out:
            for chunk in manifest["chunks"]:
                with open(os.path.join(received, chunk["name"]), "rb") as src:
                    shutil.copyfileobj(src, out)
        if sha256(joined) != manifest["tar_sha256"]:
            raise RuntimeError("the joined wheels.tar does not match the manifest's sha256")
        with tarfile.open(joined) as tar:
            tar.extractall(tmp, filter="data")
        if os.path.exists(site):
            shutil.rmtree(site)
        fresh = os.path.join(tmp, SITE)
        for name in manifest["wheels"]:
            install_wheel(os.path.join(tmp, name), fresh)
        os.replace(fresh, site)
    with open(marker, "w") as f:
        json.dump({"tar_sha256": manifest["tar_sha256"], "wheels": manifest["wheels"]}, f, indent=1)
    return f"installed {len(manifest['wheels'])} wheels into {os.path.relpath(site, REPO)}"


def site_dir(payload: str = PAYLOAD) -> str | None:
    """Returns the installed wheels' folder, or None if nothing has been installed. It goes on the
    path after what the machine has: it holds only packages the GPU machine lacks."""
    site = os.path.join(payload, SITE)
    return site if os.path.exists(os.path.join(site, "installed.json")) else None


def data_dir(payload: str = PAYLOAD) -> str | None:
    """Returns the carried data folder, or None."""
    found = sorted(os.path.join(payload, d, "data") for d in os.listdir(payload)
                   if os.path.isdir(os.path.join(payload, d, "data"))) if os.path.isdir(payload) else []
    return found[-1] if found else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/gpu_payload.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="download wheels, copy the data, split into carries")
    prep.add_argument("--data-dir", default=os.environ.get("TAILTUNE_DATA_DIR"),
                      help="offline archives to copy [env TAILTUNE_DATA_DIR]")
    prep.add_argument("--out", default=PAYLOAD, help="payload folder [.gpu-payload]")
    prep.add_argument("--python", default=TARGET_PYTHON, help=f"the GPU machine's Python [{TARGET_PYTHON}]")
    prep.add_argument("--carry-mib", type=float, default=60.0,
                      help="most MiB per carry (one transfer, with the code beside it) [60]")
    inst = sub.add_parser("install", help="on the GPU machine: install the carried wheels")
    inst.add_argument("--payload", default=PAYLOAD)
    args = p.parse_args(argv)
    if args.command == "prepare":
        if args.carry_mib < 8:
            p.error(f"--carry-mib {args.carry_mib:g}: expected at least 8")
        prepare(args)
        return 0
    try:
        print(install(args.payload))
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
