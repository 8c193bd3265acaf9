"""Compile the CPU kernels: `python -m whisper.kernels.build [--force]`.

Builds the C++ sources here (every .cpp) with CMake against the installed mlx (its headers,
library and CMake files) and nanobind, into whisper/kernels/_build/ (ignored by git).  Does nothing when the
library there was built from the same sources for the same mlx, nanobind and Python.
Needs cmake and a C++20 compiler.  Exits 1 with the compiler's last lines when the build fails;
the engine then keeps using MLX's own ops.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from whisper.kernels import BUILD_DIR, LIBRARY, SOURCE_DIR, STAMP, sources_sha256


def wanted_stamp() -> dict[str, str]:
    """What the library must have been built from to be up to date."""
    try:
        nanobind = version("nanobind")
    except PackageNotFoundError:
        nanobind = "missing"
    return {
        "sources_sha256": sources_sha256(),
        "mlx_version": version("mlx"),
        "nanobind_version": nanobind,
        "python": sysconfig.get_config_var("SOABI") or sys.version,
    }


def up_to_date(stamp: dict[str, str]) -> bool:
    return LIBRARY.exists() and STAMP.exists() and json.loads(STAMP.read_text()) == stamp


def run(command: list[str], log: Path) -> None:
    with log.open("a") as out:
        out.write(f"$ {' '.join(command)}\n")
        out.flush()
        subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, check=True)


def build(force: bool = False) -> bool:
    """Builds the library unless it is up to date; True when it is usable afterwards."""
    stamp = wanted_stamp()
    if not force and up_to_date(stamp):
        print("menny: compiled kernels up to date")
        return True
    missing = [tool for tool in ("cmake", "c++") if shutil.which(tool) is None]
    if stamp["nanobind_version"] == "missing":
        missing.append("the nanobind Python package")
    if missing:
        print(f"menny: cannot build the compiled kernels, missing: {', '.join(missing)}", file=sys.stderr)
        return False
    BUILD_DIR.mkdir(exist_ok=True)
    work = BUILD_DIR / "cmake"
    staging = work / "out"
    log = BUILD_DIR / "build.log"
    log.write_text("")
    STAMP.unlink(missing_ok=True)
    configure = ["cmake", "-S", str(SOURCE_DIR), "-B", str(work), "-DCMAKE_BUILD_TYPE=Release"]
    configure += [f"-DPython_EXECUTABLE={sys.executable}", f"-DOUTPUT_DIR={staging}"]
    if shutil.which("ninja") and not (work / "Makefile").exists():
        configure += ["-G", "Ninja"]
    print("menny: compiling the CPU kernels (about a minute the first time)")
    try:
        run(configure, log)
        run(["cmake", "--build", str(work), "--parallel", str(os.cpu_count() or 1)], log)
    except (subprocess.CalledProcessError, OSError) as error:
        tail = "\n".join(log.read_text().splitlines()[-25:])
        print(f"{tail}\nmenny: building the compiled kernels failed ({error}); full log: {log}", file=sys.stderr)
        return False
    # Replaced, not rewritten in place: a running engine may have the old library mapped.
    os.replace(staging / LIBRARY.name, LIBRARY)
    STAMP.write_text(json.dumps(stamp, indent=1) + "\n")
    print(f"menny: compiled kernels built: {LIBRARY}")
    return True


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args()
    BUILD_DIR.mkdir(exist_ok=True)
    # Two set-ups running at once (start and test) build one after the other.
    with (BUILD_DIR / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return 0 if build(args.force) else 1


if __name__ == "__main__":
    sys.exit(main())
