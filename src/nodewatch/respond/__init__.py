"""respond: actions on events (webhook, exec, haproxy, nginx), drains, recovery."""

__all__: list[str] = []
