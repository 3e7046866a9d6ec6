"""The gateway: OpenAI-compatible front door, feedback, and the policy registry with its promotion gate.

Modules: `protocol` (request models), `forwarding` (completions, models),
`feedback` (/v1/feedback, /v1/prompts), `admin` (versions, promote, pin,
rollback), `health` (/healthz, /readyz, /metrics), `engine` (what vLLM
serves), `book` (versions and promotion rules), `gate` (held-out scoring of
new versions), `served` (responses kept for feedback), `outbox` (Kafka).
"""

from service.gateway.app import create_app

__all__ = ["create_app"]
