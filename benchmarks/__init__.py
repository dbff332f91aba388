"""Side-by-side benchmarks of soniq-tvm against its peers (``python -m benchmarks.run``).

Not part of the installed package: run it from the repository root. See
``benchmarks/README.md``.
"""
