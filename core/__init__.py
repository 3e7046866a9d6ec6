"""odpo's ground floor: the vocabulary every component and the top share.

Contracts (one pydantic model per topic), settings, the Kafka bus, the
embedded broker launcher, the adapter store, the base-model assets, the
process runtime, JSONL dataset lines and the shared errors. Nothing here
imports a component (generator, judge, trainer) or the top (service);
tests/test_import_layers.py holds it to that.
"""
