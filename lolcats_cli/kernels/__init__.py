"""Hybrid attention in three forms: the naive O(T^2) reference, the chunked linear-memory form, and the
recurrent (prefill + step) form. Every fast path keeps the naive reference beside it and a test that they agree."""
