# The one place the version is written: pyproject.toml reads it (tool.setuptools.dynamic), and
# `alignkern --version` reads this file without importing the package (alignkern_cli.version).
__version__ = "0.1.0"
