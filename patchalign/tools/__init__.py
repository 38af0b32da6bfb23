"""Tools on top of every layer: the demo, export, pictures, benchmarks and their default paths.

Nothing below ``tools`` imports it (``tests/test_architecture.py``).
"""
