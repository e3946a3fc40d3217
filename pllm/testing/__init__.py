"""Test support shipped with pllm: the platform conformance checks
(:mod:`pllm.testing.conformance`), the pytest suite that runs them
(:mod:`pllm.testing.conformance_suite`, or ``pllm platforms --check NAME``),
and helpers to build attention metadata (:mod:`pllm.testing.metadata`)."""
