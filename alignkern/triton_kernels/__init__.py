"""Triton kernels and their launchers, one op family per module. Imported lazily by the ops."""
