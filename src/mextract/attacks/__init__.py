"""Extraction strategies, one module each, behind :mod:`mextract.attacks.registry`.

This package's ``__init__`` imports nothing heavy, so the workflow can read the
registry without importing torch. Use ``mextract.attacks.base`` for the context and
result types and ``registry.load(name).run(ctx, params)`` to run a strategy.
"""
