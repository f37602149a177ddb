"""A ``Backend`` over an in-process ``Pipeline``: every stage in this process, for single-process use
and for testing the API end to end against real tokens.

Sequences take turns: each step (a prefill, or one decode token) of any sequence runs on one worker
thread, so several requests progress together without batching, and the event loop never runs a
forward pass. A sequence reserves its KV cache at admission (``KVCacheFull``: 429 while others hold
the memory, 400 when it can never fit). Closing a sequence's iterator frees its cache on the same
worker thread, after any step of it still running there.

Must not: tokenize, know HTTP, or batch (the distributed pipeline's scheduler does that).
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import torch

from butterfly.engine.generate import Pipeline
from butterfly.engine.kvcache import KVCacheFull
from butterfly.engine.model import SeqChunk
from butterfly.engine.sampler import SeqSampler
from butterfly.serving.backend import Finished, GenerationRequest, ServingError, TokenEvent

__all__ = ["LocalBackend"]


class LocalBackend:
    def __init__(self, pipeline: Pipeline) -> None:
        self._pipe = pipeline
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="local-backend")
        self._ids = itertools.count(1)
        self.active: set[int] = set()
        """Sequences holding a cache reservation (tests check that closing frees it)."""

    def close(self) -> None:
        self._worker.shutdown(wait=True)

    def _step(self, seq_id: int, tokens: list[int], pos: int, sampler: SeqSampler) -> int:
        with torch.inference_mode():
            x = torch.tensor(tokens, dtype=torch.long)
            logits = self._pipe.step(x, [SeqChunk(seq_id, pos, len(tokens))])
            return sampler(logits[0])

    def _free(self, seq_id: int) -> None:
        self._pipe.free(seq_id)
        self.active.discard(seq_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]:
        if not request.prompt_ids:
            raise ServingError(400, "invalid_value", "the prompt is empty")
        loop = asyncio.get_running_loop()
        seq_id = next(self._ids)
        prompt = list(request.prompt_ids)
        try:
            await loop.run_in_executor(
                self._worker, self._pipe.reserve, seq_id, len(prompt) + request.max_tokens
            )
        except KVCacheFull as e:
            if e.reason == "budget":
                raise ServingError(
                    400, "context_length_exceeded", f"the request does not fit this node: {e}"
                ) from None
            raise ServingError(429, "kv_cache_full", f"busy, retry later: {e}") from None
        self.active.add(seq_id)
        sampler = SeqSampler(request.params)
        generated = 0
        try:
            tokens, pos = prompt, 0
            while generated < request.max_tokens:
                tok = await loop.run_in_executor(self._worker, self._step, seq_id, tokens, pos, sampler)
                pos += len(tokens)
                generated += 1
                yield TokenEvent(tok)
                if tok in request.stop_token_ids:
                    yield Finished("stop", len(prompt), generated)
                    return
                tokens = [tok]
            yield Finished("length", len(prompt), generated)
        finally:
            # Queued behind any step of this sequence still on the worker (a cancelled await does
            # not stop the thread): the cache is never freed under a running step.
            self._worker.submit(self._free, seq_id)
