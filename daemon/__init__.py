"""runwatch node daemon: ingest, store, rules, actions, alerts and exporters.

Imports and runs without torch. Start it with ``runwatch daemon``.
"""

__version__ = "0.1.0"
