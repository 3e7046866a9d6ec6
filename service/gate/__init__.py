"""The promotion gate (`odpo gate`): the one writer of the policy registry.

It scores `base` and every new version on held-out prompts before it may
become `policy` (`promotion`, `verdict`), keeps the registry (`service/
registry/book.py`) in a file (`registry_file`) and publishes every decision
on the control topic (`control`, `publish`), where the gateway replicas read
it; operators change it through its admin API (`admin`). Its metrics are
`odpo_gate_*` (`metrics`).
"""

from service.gate.app import create_gate_app

__all__ = ["create_gate_app"]
