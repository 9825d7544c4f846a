"""collect: what runs on every node: sampling, self-checks, identity and the agent HTTP API."""

__all__: list[str] = []
