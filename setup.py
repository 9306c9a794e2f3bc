"""Builds alignkern._C (the C++ CPU kernels and, when a CUDA compiler is found, the CUDA kernels)
through CMakeLists.txt.

A build is kept in build/alignkern-ext/ under the checkout, keyed on everything that goes into it
(the sources in csrc/, CMakeLists.txt, this file, the settings below, the Python version, pybind11
and the compilers): a second install of the same checkout (`pip install .` then
`pip install -e .`, each in its own temporary build environment) copies the kept module instead of
compiling it again. The build says on the terminal that it is running, and how far it is (pip
shows a build's own output only with -v).

Environment:
  ALIGNKERN_SKIP_CUDA=1         build the CPU kernels only (a much shorter build)
  ALIGNKERN_CUDA_ARCHS="80;90"  CUDA architectures (default: 80;90)
  ALIGNKERN_BUILD_TYPE=Debug    CMake build type (default: Release)
  ALIGNKERN_SANITIZE=address    build the C++ sources with AddressSanitizer (-fsanitize=address
                                -fno-omit-frame-pointer, at -O1 -g1; the .cu files are not
                                instrumented). Such a module imports only with the ASan runtime
                                and libstdc++ preloaded (LD_PRELOAD): `bash .ci/asan [pytest args]`
                                builds one in a scratch copy of the tree and runs tests under it.
                                Never install it into a shared environment.
  ALIGNKERN_REBUILD=1           compile even when a kept build matches (and keep the new one)
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
KEPT = ROOT / "build" / "alignkern-ext"  # gitignored, like all of build/
KEEP_AT_MOST = 4  # kept builds (e.g. the normal one and a CPU-only one); the oldest go first
# Environment variables that CMake or the compilers read, so a change in them means a new build.
COMPILER_ENV = ("CC", "CXX", "CUDACXX", "CUDAHOSTCXX", "CUDA_HOME", "CUDA_PATH", "CFLAGS",
                "CXXFLAGS", "CPPFLAGS", "LDFLAGS", "CUDAFLAGS", "CMAKE_GENERATOR", "CMAKE_ARGS")


def settings(env=os.environ) -> dict:
    """The build's settings from the environment (see the module docstring)."""
    return {
        "CMAKE_BUILD_TYPE": env.get("ALIGNKERN_BUILD_TYPE", "Release"),
        "ALIGNKERN_SKIP_CUDA": "ON" if env.get("ALIGNKERN_SKIP_CUDA") == "1" else "OFF",
        "ALIGNKERN_CUDA_ARCHS": env.get("ALIGNKERN_CUDA_ARCHS", "80;90"),
        "ALIGNKERN_SANITIZE": env.get("ALIGNKERN_SANITIZE", ""),
    }


def cuda_compiler(env=os.environ) -> str | None:
    """The CUDA compiler CMake would find (CUDACXX, else nvcc on the PATH or in CUDA_HOME), or
    None when there is none or ALIGNKERN_SKIP_CUDA=1."""
    if env.get("ALIGNKERN_SKIP_CUDA") == "1":
        return None
    if env.get("CUDACXX"):
        return env["CUDACXX"]
    home = env.get("CUDA_HOME") or env.get("CUDA_PATH") or "/usr/local/cuda"
    return shutil.which("nvcc", path=env.get("PATH")) or shutil.which("nvcc", path=f"{home}/bin")


def _version_of(program: str | None) -> str:
    """The first line of ``program --version`` (the compilers' identity), or '' without one."""
    if not program:
        return ""
    try:
        out = subprocess.run([program, "--version"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return ""
    return f"{program}: {(out.stdout or out.stderr).strip()}"


def build_key(root: Path = ROOT, env=os.environ, pybind11_version: str = "") -> str:
    """A digest of everything that goes into the module: the files under csrc/, CMakeLists.txt
    and setup.py (paths and contents), the settings, the compiler-related environment and the
    compilers' versions, the Python version and ABI, and pybind11's version."""
    digest = hashlib.sha256()

    def add(label: str, data: bytes) -> None:
        digest.update(f"{label}\0{len(data)}\0".encode() + data)

    sources = sorted(p for p in (root / "csrc").rglob("*") if p.is_file())
    for path in [root / "CMakeLists.txt", root / "setup.py", *sources]:
        add(path.relative_to(root).as_posix(), path.read_bytes())
    add("settings", repr(sorted(settings(env).items())).encode())
    add("env", repr([(name, env.get(name, "")) for name in COMPILER_ENV]).encode())
    cxx = env.get("CXX") or shutil.which("c++", path=env.get("PATH"))
    add("compilers", "\n".join([_version_of(cxx), _version_of(cuda_compiler(env))]).encode())
    python = [sys.version, sys.implementation.cache_tag, sysconfig.get_config_var("EXT_SUFFIX"),
              sysconfig.get_platform()]
    add("python", repr(python).encode())
    add("pybind11", pybind11_version.encode())
    return digest.hexdigest()[:20]


def build_or_reuse(target: Path, key: str, build, kept: Path = KEPT, env=os.environ) -> bool:
    """Put the module at ``target``: a copy of the kept build for ``key`` when there is one
    (returns True), else ``build()`` (which must write ``target``), then keep a copy of it under
    ``kept/key`` (returns False). ALIGNKERN_REBUILD=1 always builds."""
    entry = kept / key / target.name
    if entry.is_file() and env.get("ALIGNKERN_REBUILD") != "1":
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(entry, target)
        os.utime(entry.parent)  # recently used: pruned last
        return True
    build()
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        partial = entry.with_name(entry.name + ".partial")
        shutil.copy2(target, partial)
        partial.replace(entry)  # whole or absent, even if two builds race
        _prune(kept)
    except OSError as error:  # keeping it is an optimisation; the build itself succeeded
        say(f"alignkern: could not keep the build in {kept} ({error})")
    return False


def _prune(kept: Path, keep: int = KEEP_AT_MOST) -> None:
    entries = sorted((p for p in kept.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    for old in entries[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def say(message: str, *, end: str = "\n", new_line: bool = False) -> None:
    """Write to the terminal the install runs in (pip captures a build's output and shows it only
    with -v), else to stderr; ``new_line``: start on a line of its own (after pip's "Building
    wheel ..."), ``end='\\r'``: a progress line that the next message overwrites."""
    try:
        with open("/dev/tty", "w") as tty:
            tty.write(("\n" if new_line else "") + message + "\033[K" + end)  # K: clear the rest
            return
    except OSError:  # no terminal: CI, a pipe
        pass
    if end == "\n":  # progress updates (end='\r') would only clutter a log
        print(message, file=sys.stderr, flush=True)


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        target = Path(self.get_ext_fullpath(ext.name)).resolve()
        key = build_key(pybind11_version=pybind11.__version__)
        if build_or_reuse(target, key, lambda: self._cmake(target.parent)):
            say(f"alignkern: {ext.name} reused from an earlier build of the same sources and "
                f"settings ({KEPT / key}; ALIGNKERN_REBUILD=1 compiles it again)", new_line=True)

    def _cmake(self, out_dir: Path) -> None:
        import pybind11

        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
                  f"-DPython_EXECUTABLE={sys.executable}",
                  f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
                  *(f"-D{name}={value}" for name, value in settings().items())]
        nvcc = cuda_compiler()
        what = (f"the C++ CPU kernels and the CUDA kernels ({nvcc}, architectures "
                f"{settings()['ALIGNKERN_CUDA_ARCHS']}); ALIGNKERN_SKIP_CUDA=1 builds the CPU "
                f"kernels only, in a fraction of the time" if nvcc else
                "the C++ CPU kernels (no CUDA: ALIGNKERN_SKIP_CUDA=1 or no nvcc found)")
        say(f"alignkern: compiling alignkern._C, {what}; kept in {KEPT} for the next install",
            new_line=True)
        start = time.monotonic()
        subprocess.run(["cmake", str(ROOT), *config], cwd=build_dir, check=True)
        _run_with_progress(["cmake", "--build", ".", "-j", str(max(1, os.cpu_count() or 1))],
                           build_dir, start)
        say(f"alignkern: alignkern._C compiled in {_minutes(time.monotonic() - start)}")


def _run_with_progress(command: list[str], cwd: Path, start: float) -> None:
    """Run ``command``, its output passed on to stdout, each '[ 42%]' it prints shown on the
    terminal with the time so far."""
    process = subprocess.Popen(command, cwd=cwd, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, errors="replace")
    for line in process.stdout:
        sys.stdout.write(line)
        percent = re.match(r"\[\s*(\d+)%\]", line)
        if percent:
            say(f"alignkern: compiling alignkern._C: {percent.group(1):>3}% "
                f"({_minutes(time.monotonic() - start)})", end="\r")
    if process.wait():
        raise subprocess.CalledProcessError(process.returncode, command)


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60):02d} s"


if __name__ == "__main__":  # also under pip (setuptools runs this file as __main__)
    setup(ext_modules=[CMakeExtension("alignkern._C")], cmdclass={"build_ext": CMakeBuild})
