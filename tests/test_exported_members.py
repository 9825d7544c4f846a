"""The public API is deliberate (as httpx pins its own): ``nodewatch.__all__`` is exactly the
public names, sorted, and each resolves."""

from __future__ import annotations

import nodewatch

PUBLIC = ["Admin", "Agent", "Client", "ClientError", "Config", "ConfigError", "Event", "Health",
          "NodeStatus", "__version__", "load_config"]


def test_all_is_the_pinned_public_api_sorted() -> None:
    assert nodewatch.__all__ == PUBLIC == sorted(PUBLIC)


def test_every_public_name_resolves_and_dir_lists_them() -> None:
    for name in nodewatch.__all__:
        assert getattr(nodewatch, name) is not None, name
    assert dir(nodewatch) == PUBLIC


def test_the_version_is_the_protocol_version() -> None:
    from nodewatch.protocol import VERSION

    assert nodewatch.__version__ == VERSION
