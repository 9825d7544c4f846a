"""api: the coordinator HTTP API, its schemas and the dashboard."""
