"""Wheels the lent GPU machine lacks, into .whl/ (ignored by git), to carry with the device tool's `run`.

    .venv/bin/python tools/prepare_device_wheels.py            # build/download, check, print the install line
    .venv/bin/python tools/prepare_device_wheels.py --check    # only check an existing folder

That machine has Python 3.12 with torch 2.11 (+cu130), timm, tensorboard, matplotlib, numpy, scikit-learn,
msgpack, ninja, psutil, py-cpuinfo, einops, cloudpickle; nothing can be downloaded there. It lacks the packages
below (timm is carried at the lock's version; `make test-device` rehearses that stack here). deepspeed and fairscale ship as sdists: they are built here as py3-none-any wheels with no compiled ops
(DS_BUILD_OPS=0; the project uses torch's fused AdamW, never DeepSpeed's JIT-built FusedAdam). The others are
downloaded for CPython 3.12 on manylinux x86-64 (pydantic-core is the only compiled one). Versions come from
requirements/lock.txt. The wheels plus the working tree must stay under the tool's 64 MiB per call.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LIMIT_MIB = 64.0  # the device tool's working-tree limit (tracked + untracked-not-ignored + carried paths)
BUILT = ["deepspeed", "fairscale"]  # sdists: pip wheel here, no compiled ops
# timm is on that machine at a version nobody has read: the lock's is carried so that the models are the tested ones.
DOWNLOADED = ["timm", "webdataset", "submitit", "hjson", "braceexpand", "pydantic", "pydantic_core", "annotated-types",
              "typing-inspection", "typing_extensions"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64"]
INSTALL = ("python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade "
           "--target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site")


def normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def lock_versions(lock: Path = REPO / "requirements" / "lock.txt") -> dict[str, str]:
    pins = [line.strip().split("==") for line in lock.read_text().splitlines() if "==" in line]
    return {normalise(name): version for name, version in pins}


def _pin(name: str, versions: dict[str, str]) -> str:
    if normalise(name) not in versions:
        raise SystemExit(f"prepare_device_wheels: {name} has no pin in requirements/lock.txt")
    return f"{name}=={versions[normalise(name)]}"


def _pip(args: list[str], env: dict[str, str] | None = None) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "-q", "--disable-pip-version-check"]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env=env)


def build(out: Path, versions: dict[str, str]) -> None:
    out.mkdir(exist_ok=True)
    env = {**os.environ, "DS_BUILD_OPS": "0"}
    _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(out), *(_pin(n, versions) for n in BUILT)], env)
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    _pip(["download", "--no-deps", "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp",
          *platforms, "-d", str(out), *(_pin(n, versions) for n in DOWNLOADED)])
    for old in out.glob("lacvit_dist-*.whl"):
        old.unlink()  # the project's wheel is rebuilt every time: its version string does not change with the code
    _pip(["wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)])


def check(out: Path, versions: dict[str, str]) -> list[str]:
    """Problems with the folder: a missing or doubled package (pip refuses two versions), a version other than
    the lock's, a wheel that cannot install on CPython 3.12 x86-64, or a total over the budget."""
    wheels = sorted(out.glob("*.whl"))
    by_name: dict[str, list[Path]] = {}
    for wheel in wheels:
        by_name.setdefault(normalise(wheel.name.split("-")[0]), []).append(wheel)
    problems = []
    for name in BUILT + DOWNLOADED + ["lacvit_dist"]:
        found = by_name.get(normalise(name), [])
        if len(found) != 1:
            problems.append(f"{out}: {len(found)} wheels for {name} (need exactly one): {[p.name for p in found]}")
            continue
        parts = found[0].name[:-4].split("-")
        if name != "lacvit_dist" and parts[1] != versions[normalise(name)]:
            problems.append(f"{found[0]}: version {parts[1]}, but requirements/lock.txt pins {versions[normalise(name)]}")
        python_tag, abi_tag, platform_tag = parts[-3:]
        if not (python_tag in ("py3", "py2.py3", "cp312") and (platform_tag == "any" or "x86_64" in platform_tag)):
            problems.append(f"{found[0]}: tags {python_tag}-{abi_tag}-{platform_tag} do not install on CPython 3.12 x86-64")
    total = sum(w.stat().st_size for w in wheels) / 2 ** 20
    tree = working_tree_mib()
    if total + tree > LIMIT_MIB:
        problems.append(f"{out}: {total:.1f} MiB of wheels + {tree:.1f} MiB of working tree > {LIMIT_MIB:.0f} MiB")
    return problems


def working_tree_mib() -> float:
    """What the device tool sends besides carried paths: tracked and untracked-not-ignored files."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, check=True,
                            capture_output=True).stdout.decode().split("\0")
    return sum((REPO / p).stat().st_size for p in listed if p and (REPO / p).is_file()) / 2 ** 20


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / ".whl")
    p.add_argument("--check", action="store_true", help="only check the folder")
    args = p.parse_args(argv)
    versions = lock_versions()
    if not args.check:
        build(args.out, versions)
    problems = check(args.out, versions)
    for problem in problems:
        print("prepare_device_wheels:", problem, file=sys.stderr)
    if problems:
        return 1
    total = sum(w.stat().st_size for w in args.out.glob("*.whl")) / 2 ** 20
    print(f"{len(list(args.out.glob('*.whl')))} wheels, {total:.1f} MiB (+ {working_tree_mib():.1f} MiB working "
          f"tree; limit {LIMIT_MIB:.0f} MiB). On the device (run with carry=['.whl']):\n  {INSTALL}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
