"""Benchmark suite of mtgworkers (see bench/README.md).

``python -m bench run`` measures the proxy against a no-crypto relay in the same run;
``python -m bench smoke`` runs every scenario at tiny scale as a correctness check.
"""
