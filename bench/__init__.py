"""Benchmarks of backpack-jax against the PyTorch reference, beside the machine's physical bounds.

Run `python -m bench [--quick]` after `pip install -e ".[bench]"`; see BENCHMARKS.md for the
figures. Benchmarks are not tests: nothing here asserts a speed.
"""
