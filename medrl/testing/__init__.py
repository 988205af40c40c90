"""Test harness shipped with medrl for tests and benchmarks, never imported by production code: the loopback
OpenAI-compatible judge server (``python -m medrl.testing.loopback_server``)."""
