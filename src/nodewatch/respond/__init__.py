"""respond: actions on events (webhook, exec, haproxy, nginx), drains, recovery."""
