"""One deployment's Kafka names: topic prefix, partitions, replication factor, consumer groups.

The `TOPIC_*` constants of core/contracts.py are base names. Every topic a
component reads or writes is named by `topic_name(base)` (the deployment's
`CommonSettings.topic_prefix` + the base name), and every consumer group by
`group_name(group_id)` (applied by `core.bus.new_consumer`), so two
deployments with different prefixes share one Kafka cluster without sharing a
message, a group or a committed offset. The prefix is empty by default: the
names stay `odpo.prompts` and so on.

`core.bus.ensure_topics` creates the topics with `topic_partitions`
partitions and `topic_replication_factor` replicas, except the topics in
`SINGLE_PARTITION`, which always get one partition:

- `odpo.control`: the gate writes every record to partition 0 and its readers
  read partition 0 only; the registry's acceptance rules need the one order of
  one partition (service/registry/, service/gate/publish.py).
- `odpo.adapters`: one writer (the trainer), compacted by version name, a few
  records per hour; its readers (generator, gate, `odpo up`) read it from the
  start without a group, and one partition keeps the versions in the order
  they were made.
- a topic of another name (a gateway's or gate's own `control_topic`).

Like the Kafka security settings, the layout is this process's: a component
sets it at start (`core.bus.configure_kafka(common)` calls `configure`), and
a process that never does reads it from its environment and `ODPO_CONFIG` on
first use.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from core.contracts import (
    ALL_TOPICS,
    TOPIC_CANDIDATES,
    TOPIC_DLQ,
    TOPIC_FEEDBACK,
    TOPIC_PREFERENCES,
    TOPIC_PROMPTS,
    TOPIC_SERVED,
)

# Topics that get `topic_partitions` partitions: each is read by a consumer group (several generators, judges
# share the work; the one trainer takes every partition) or in full per partition (odpo.served, odpo.dlq).
PARTITIONED = frozenset({TOPIC_PROMPTS, TOPIC_CANDIDATES, TOPIC_PREFERENCES, TOPIC_FEEDBACK, TOPIC_SERVED, TOPIC_DLQ})


@dataclass(frozen=True)
class TopicLayout:
    """Names and shape of one deployment's topics."""

    prefix: str = ""
    partitions: int = 1
    replication_factor: int = 1

    def name(self, base: str) -> str:
        """The topic a base name (a `TOPIC_*` constant, or a configured `control_topic`) stands for."""
        return f"{self.prefix}{base}"

    def base(self, name: str) -> str:
        """The base name of one of this deployment's topics (a name without the prefix is returned as it is)."""
        return name[len(self.prefix):] if self.prefix and name.startswith(self.prefix) else name

    def group(self, group_id: str) -> str:
        """The consumer group a configured group id stands for."""
        return f"{self.prefix}{group_id}"

    def partitions_of(self, name: str) -> int:
        """Partitions the topic `name` (a full name) is created with."""
        return self.partitions if self.base(name) in PARTITIONED else 1

    def all_topics(self) -> list[str]:
        """Every topic of the deployment, full names."""
        return [self.name(base) for base in ALL_TOPICS]


_layout: TopicLayout | None = None
_lock = threading.Lock()


def layout_of(common) -> TopicLayout:
    """The layout a CommonSettings names."""
    return TopicLayout(prefix=common.topic_prefix, partitions=common.topic_partitions,
                       replication_factor=common.topic_replication_factor)


def configure(layout: TopicLayout | None) -> None:
    """Set this process's layout (None: read it from CommonSettings again on next use; tests)."""
    global _layout
    with _lock:
        _layout = layout


def current() -> TopicLayout:
    """This process's layout: the configured one, else (first use) what CommonSettings names."""
    global _layout
    with _lock:
        if _layout is None:
            from core.settings import CommonSettings

            _layout = layout_of(CommonSettings())
        return _layout


def topic_name(base: str) -> str:
    """The full name of a topic of this deployment: the one way a component names a topic it reads or writes."""
    return current().name(base)


def base_name(name: str) -> str:
    """The base name of one of this deployment's topics (what `topic_name` was given)."""
    return current().base(name)


def group_name(group_id: str) -> str:
    """The full name of a consumer group of this deployment."""
    return current().group(group_id)
