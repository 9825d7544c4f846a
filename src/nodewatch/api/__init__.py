"""api: the coordinator HTTP API, its schemas and the dashboard."""

__all__: list[str] = []
