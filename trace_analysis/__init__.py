"""Reading exported spans back, offline: the per-round breakdown, its chart and a Perfetto timeline
(`specdec trace-report`, `specdec study`). Knows the span names and attributes the services emit,
never how they compute them; nothing here runs inside a service.
"""
