"""detect: the pure node state machine and policies, the check scheduler, the poller."""

__all__: list[str] = []
