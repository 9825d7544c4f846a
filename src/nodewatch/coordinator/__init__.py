"""The coordinator service around the pure core: persistence, leadership, the poller and its
probes, the probe pool and the process entry."""

__all__: list[str] = []
