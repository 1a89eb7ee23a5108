"""Instrumentation inside every specdec process: tracing setup and exporters, gRPC tracing interceptors
and metrics. Reading spans back is trace_analysis/'s.
"""
