"""Checkout tools, outside the wheel: regenerate the checked-in files from the code.

``python -m tools.golden`` rewrites ``generated/``; ``python -m tools.docs`` rewrites the
spec's JSON Schema and reference. Tests import them to fail when a checked-in file is stale.
"""
