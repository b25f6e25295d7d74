"""Benchmarks of mailtls-operator: ``make bench`` (``python -m bench``).

Every benchmark prints a table with its figure, a baseline measured in the same
run and their ratio (machines are noisy: compare ratios, not absolute times),
and writes ``bench/results/<name>.json``.  ``python -m bench --help`` lists them.
"""
