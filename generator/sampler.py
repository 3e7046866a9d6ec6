"""One prompt -> one CandidateSet: tokenize once, one /v1/completions request with n samples.

The prompt is sent as token ids, so the ids in the CandidateSet are exactly
what the policy was conditioned on (the trainer scores those same ids). Each
completion keeps vLLM's token ids (with the final EOS when it stopped) and the
per-token logprobs of the sampling policy, aligned one to one.
"""

from __future__ import annotations

import math
import time

import httpx
from pydantic import ValidationError

from generator.adapters import AdapterManager
from generator.metrics import IN_FLIGHT, REQUEST_LATENCY
from core.bus import validation_message
from core.contracts import CandidateSet, Completion, PromptEvent, SamplingParams
from core.settings import GeneratorSettings

# A server that is down, restarting or has not re-registered the adapter yet: wait and retry.
TRANSIENT_STATUS = frozenset({404, 408, 429, 502, 503, 504})


class PromptRejected(Exception):
    """This prompt cannot be sampled (too long, refused by vLLM): it belongs in the DLQ."""


class ServerFailed(Exception):
    """vLLM answered with a server error; retrying the same prompt may work."""


class Sampler:
    """Samples `settings.n` completions of a prompt from the current policy version."""

    def __init__(self, client: httpx.Client, tokenizer, adapters: AdapterManager, settings: GeneratorSettings):
        self.client, self.tokenizer, self.adapters, self.settings = client, tokenizer, adapters, settings
        self.params = _checked(SamplingParams(n=settings.n, temperature=settings.temperature, top_p=settings.top_p,
                                              max_tokens=settings.max_tokens, seed=settings.seed))

    def prompt_token_ids(self, event: PromptEvent) -> list[int]:
        """Chat messages through the chat template (with the assistant header), or plain text as is."""
        if event.messages is not None:
            msgs = [m.model_dump() for m in event.messages]
            out = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)
            ids = out["input_ids"] if not isinstance(out, list) else out
        else:
            ids = self.tokenizer(event.text)["input_ids"]
        return [int(i) for i in ids]

    def sample(self, event: PromptEvent, model: str | None = None,
               params: SamplingParams | None = None) -> CandidateSet:
        """One request for n samples from `model` (default: the current version).

        Raises PromptRejected (dead-letter it), ServerFailed (retry a few
        times) or httpx.TransportError (the server is unreachable: wait).
        """
        params = _checked(params) if params else self.params
        ids = self.prompt_token_ids(event)
        if len(ids) + params.max_tokens > self.settings.max_model_len:
            raise PromptRejected(f"prompt has {len(ids)} tokens; with max_tokens={params.max_tokens} it exceeds "
                                 f"max_model_len={self.settings.max_model_len}")
        with self.adapters.using(model) as (name, version):
            body = {"model": name, "prompt": ids, "n": params.n, "temperature": params.temperature,
                    "top_p": params.top_p, "max_tokens": params.max_tokens, "logprobs": 0,
                    "return_token_ids": True}
            if params.seed is not None:
                body["seed"] = params.seed
            t0 = time.monotonic()
            IN_FLIGHT.inc()
            try:
                resp = self.client.post("/v1/completions", json=body, timeout=self.settings.request_timeout_s)
            finally:
                IN_FLIGHT.dec()
        if resp.status_code in TRANSIENT_STATUS or resp.status_code >= 500:
            raise ServerFailed(f"HTTP {resp.status_code} from vLLM: {resp.text[:300]}")
        if resp.status_code != 200:
            raise PromptRejected(f"vLLM refused the prompt: HTTP {resp.status_code} {resp.text[:500]}")
        REQUEST_LATENCY.observe(time.monotonic() - t0)
        try:
            completions = [_completion(c) for c in sorted(resp.json()["choices"], key=lambda c: c["index"])]
            return CandidateSet(prompt=event, prompt_token_ids=ids, completions=completions,
                                policy_version=version, sampling=params)
        except ValidationError as exc:
            raise PromptRejected(f"vLLM's answer does not make a CandidateSet: {validation_message(exc)}") from exc
        except (KeyError, TypeError, ValueError) as exc:
            raise ServerFailed(f"unexpected answer from vLLM: {exc!r}") from exc


def _completion(choice: dict) -> Completion:
    token_ids = choice["token_ids"]
    logprobs = choice["logprobs"]["token_logprobs"]
    if any(lp is None or not math.isfinite(lp) for lp in logprobs):
        raise ValueError("a sampled token has no finite logprob")
    return Completion(text=choice["text"], token_ids=token_ids, logprobs=logprobs,
                      finish_reason=choice.get("finish_reason"))


def _checked(params: SamplingParams) -> SamplingParams:
    if params.temperature == 0 and params.n > 1:  # vLLM refuses it, and n equal samples make no pairs
        raise ValueError(f"temperature 0 (greedy) gives {params.n} identical samples; use temperature > 0")
    return params
