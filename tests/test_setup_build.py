"""setup.py: a build of alignkern._C is kept under build/alignkern-ext/ and reused by the next
install of the same sources and settings (the README's two Quickstart commands each built it, about
5 minutes apiece), and compiled again when anything that goes into it changes."""

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup_py():
    """setup.py as a module: its functions, without running setup() (that runs as __main__)."""
    spec = importlib.util.spec_from_file_location("alignkern_setup", REPO / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def tree(tmp_path):
    """A checkout's build inputs: CMakeLists.txt, setup.py, csrc/ with a file in a subfolder."""
    root = tmp_path / "checkout"
    (root / "csrc" / "cpu").mkdir(parents=True)
    shutil.copy(REPO / "setup.py", root / "setup.py")
    (root / "CMakeLists.txt").write_text("project(x)\n")
    (root / "csrc" / "bindings.cpp").write_text("int bind();\n")
    (root / "csrc" / "cpu" / "kernel.cpp").write_text("int kernel() { return 1; }\n")
    return root


def test_the_key_changes_with_what_goes_into_the_build_and_only_that(setup_py, tree):
    env = {"PATH": os.environ.get("PATH", "")}

    def key(env=env, pybind11="2.13.6"):
        return setup_py.build_key(tree, env, pybind11)

    first = key()
    assert key() == first
    (tree / "README.md").write_text("not a build input\n")
    (tree / "docs").mkdir()
    assert key() == first
    kernel = tree / "csrc" / "cpu" / "kernel.cpp"
    kernel.write_text("int kernel() { return 2; }\n")
    assert key() != first
    kernel.write_text("int kernel() { return 1; }\n")
    assert key() == first  # the contents count, not the file's time
    (tree / "csrc" / "cpu" / "new.cpp").write_text("\n")
    assert key() != first
    (tree / "csrc" / "cpu" / "new.cpp").unlink()
    for name, value in [("ALIGNKERN_SKIP_CUDA", "1"), ("ALIGNKERN_CUDA_ARCHS", "90"),
                        ("ALIGNKERN_BUILD_TYPE", "Debug"), ("ALIGNKERN_SANITIZE", "address"),
                        ("CXXFLAGS", "-march=native")]:
        assert key({**env, name: value}) != first, name
    assert key(pybind11="3.0.0") != first
    (tree / "setup.py").write_text((tree / "setup.py").read_text() + "\n# changed\n")
    assert key() != first


def test_a_second_install_copies_the_kept_build(setup_py, tmp_path):
    kept = tmp_path / "kept"
    built = []

    def build(target):
        def run():
            built.append(target)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"module %d" % len(built))
        return run

    wheel = tmp_path / "wheel-build" / "alignkern" / "_C.so"
    assert setup_py.build_or_reuse(wheel, "k1", build(wheel), kept, env={}) is False
    assert (kept / "k1" / "_C.so").read_bytes() == b"module 1"
    editable = tmp_path / "checkout" / "alignkern" / "_C.so"
    assert setup_py.build_or_reuse(editable, "k1", build(editable), kept, env={}) is True
    assert built == [wheel] and editable.read_bytes() == b"module 1"
    # another key, or ALIGNKERN_REBUILD=1: compiled again, and the new build kept
    assert setup_py.build_or_reuse(editable, "k2", build(editable), kept, env={}) is False
    assert setup_py.build_or_reuse(editable, "k1", build(editable), kept,
                                   env={"ALIGNKERN_REBUILD": "1"}) is False
    assert (kept / "k1" / "_C.so").read_bytes() == b"module 3" and len(built) == 3


def test_a_failed_build_keeps_nothing(setup_py, tmp_path):
    def fail():
        raise RuntimeError("compiler error")

    with pytest.raises(RuntimeError, match="compiler error"):
        setup_py.build_or_reuse(tmp_path / "out" / "_C.so", "k", fail, tmp_path / "kept", env={})
    assert not (tmp_path / "kept" / "k").exists()


def test_only_the_most_recently_used_builds_are_kept(setup_py, tmp_path):
    kept = tmp_path / "kept"
    for i in range(setup_py.KEEP_AT_MOST + 2):
        entry = kept / f"k{i}"
        entry.mkdir(parents=True)
        os.utime(entry, (1000 + i, 1000 + i))
    os.utime(kept / "k0", (5000, 5000))  # reused lately
    setup_py._prune(kept)
    left = {p.name for p in kept.iterdir()}
    assert len(left) == setup_py.KEEP_AT_MOST and "k0" in left and "k1" not in left
