"""soniq_tvm.passes: Relax passes of the SONIQ compiler (one pass per file)."""
