"""store: one Store protocol with SQLite (default), etcd and Redis backends."""
