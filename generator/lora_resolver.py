"""A vLLM LoRA resolver over the adapter store: any replica serves any announced `policy-v<N>` on first request.

vLLM calls a registered resolver when a request names a model that is not
loaded (only with `VLLM_ALLOW_RUNTIME_LORA_UPDATING`, which the generator
sets). This one answers for `policy-v<N>` names from the adapter store, and
only for versions the trainer announced (`announced/policy-v<N>.json`) whose
folder's sha256 matches the announcement: a half-copied or tampered folder
is never served. vLLM's own filesystem resolver would serve any folder under
a directory, unchecked, and only when the adapter names the exact model path
vLLM was started with.

It is a vLLM general plugin (entry point `vllm.general_plugins` in
pyproject.toml), loaded in vLLM's own processes; it registers itself only
when `ODPO_LORA_STORE` names the store (the generator sets it for the vLLM it
starts; set it yourself on a vLLM you run).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from core.adapter_store import AdapterFolderError, read_manifest, verified_folder
from core.contracts import parse_version_name

log = logging.getLogger(__name__)

STORE_ENV = "ODPO_LORA_STORE"
RESOLVER_NAME = "odpo adapter store"


def store_lora_path(store: Path, lora_name: str) -> Path | None:
    """The folder of an announced, intact `policy-v<N>` in `store`; None for any other name or a bad folder."""
    version = parse_version_name(lora_name)
    if version is None or version < 1:
        return None
    ready = read_manifest(store, version)
    if ready is None:
        return None
    try:
        return verified_folder(store, ready.path, ready.sha256)
    except AdapterFolderError as exc:
        log.error("odpo resolver: not serving %s: %s", lora_name, exc)
        return None


def register() -> None:
    """vLLM general-plugin hook: register the store resolver when `ODPO_LORA_STORE` is set."""
    store = os.environ.get(STORE_ENV)
    if not store:
        return
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    class StoreResolver(LoRAResolver):
        def __init__(self, root: Path):
            self.root = root

        async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
            folder = await asyncio.to_thread(store_lora_path, self.root, lora_name)
            if folder is None:
                return None
            log.info("odpo resolver: serving %s from %s", lora_name, folder)
            # vLLM replaces the id with its own counter's next value
            return LoRARequest(lora_name=lora_name, lora_int_id=parse_version_name(lora_name), lora_path=str(folder))

    if RESOLVER_NAME not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver(RESOLVER_NAME, StoreResolver(Path(store)))
