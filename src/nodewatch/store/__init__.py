"""store: one Store protocol with SQLite (default), etcd and Redis backends."""

__all__: list[str] = []
