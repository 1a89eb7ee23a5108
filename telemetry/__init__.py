"""Observability for every specdec process: tracing setup and exporters, metrics, and the tools that read
exported spans back (per-round breakdown, chart, Perfetto timeline).

Knows the span names and attributes the orchestrator and services emit, never how they compute them.
"""
