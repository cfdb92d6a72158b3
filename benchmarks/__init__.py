"""Benchmarks: one module per figure, each with ``run(quick: bool) -> dict``.

``python -m benchmarks NAME [--quick]`` runs one, ``python -m benchmarks all`` every one; each
prints its JSON as the last line and writes ``benchmarks/results/NAME.json``. Figures compare
two things measured in the same run (ratios), because this machine's absolute speed varies.
"""
