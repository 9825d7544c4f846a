"""The command line: commands, rendering, the blocking client and the demo."""

__all__: list[str] = []
