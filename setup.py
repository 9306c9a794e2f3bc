"""Builds alignkern._C (the C++ CPU kernels and, when a CUDA compiler is found, the CUDA kernels)
through CMakeLists.txt.

Environment:
  ALIGNKERN_SKIP_CUDA=1         build the CPU kernels only
  ALIGNKERN_CUDA_ARCHS="80;90"  CUDA architectures (default: 80;90)
  ALIGNKERN_BUILD_TYPE=Debug    CMake build type (default: Release)
  ALIGNKERN_SANITIZE=address    build the C++ sources with AddressSanitizer (-fsanitize=address
                                -fno-omit-frame-pointer, at -O1 -g1; the .cu files are not
                                instrumented). Such a module imports only with the ASan runtime
                                and libstdc++ preloaded (LD_PRELOAD): `bash .ci/asan [pytest args]`
                                builds one in a scratch copy of the tree and runs tests under it.
                                Never install it into a shared environment.
"""

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / "cmake"
        build_dir.mkdir(parents=True, exist_ok=True)
        config = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={os.environ.get('ALIGNKERN_BUILD_TYPE', 'Release')}",
            f"-DALIGNKERN_SKIP_CUDA={'ON' if os.environ.get('ALIGNKERN_SKIP_CUDA') == '1' else 'OFF'}",
            f"-DALIGNKERN_CUDA_ARCHS={os.environ.get('ALIGNKERN_CUDA_ARCHS', '80;90')}",
            f"-DALIGNKERN_SANITIZE={os.environ.get('ALIGNKERN_SANITIZE', '')}",
        ]
        jobs = str(max(1, os.cpu_count() or 1))
        subprocess.run(["cmake", str(ROOT), *config], cwd=build_dir, check=True)
        subprocess.run(["cmake", "--build", ".", "-j", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("alignkern._C")], cmdclass={"build_ext": CMakeBuild})
