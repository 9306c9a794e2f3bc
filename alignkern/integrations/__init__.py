"""Integrations with the libraries that self-correction loops already run (transformers, TRL).

Each submodule imports its library when it is imported itself; ``import alignkern`` imports none
of them. Install the extras: ``pip install "alignkern[hf]"``.
"""
