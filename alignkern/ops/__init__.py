"""Registered alignkern ops, one op family per module."""
