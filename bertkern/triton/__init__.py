"""Triton kernels, one module per op. Imported lazily by bertkern.ops so that triton stays optional."""
