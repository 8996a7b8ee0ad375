"""Functions that run in forked children (module level, so a forkserver can find them)."""

from __future__ import annotations

import os


def publish_one(host: str, project: str, prefix: str, client: str, i: int) -> None:
    """Create a publisher after the fork, publish one message, confirm it (exit 0 only then)."""
    os.environ["PUBSUB_EMULATOR_HOST"] = host
    from signalgen.brokers.pubsub import Publisher, TopicNames
    from tests.integration.pubsub.helpers import signal_messages

    names = TopicNames(prefix)
    publisher = Publisher(project, names, "live", client)
    [message] = signal_messages(client, "forked", f"S{i}", 1)
    publisher.publish(names.internal("live", "signals", client), message)
    publisher.close(timeout=30)
