"""The gateway: OpenAI-compatible front door and feedback; a stateless reader of the gate's decisions.

Modules: `protocol` (request models, JSON errors), `forwarding` (completions,
models), `feedback` (/v1/feedback, /v1/prompts), `health` (/healthz,
/readyz, /metrics), `engine` and `endpoints` (what the vLLM engines serve),
`served` (responses kept for feedback), `outbox` (Kafka). The registry it
routes by is the gate's (service/gate/), read through service/registry/.
"""

from service.gateway.app import create_app

__all__ = ["create_app"]
