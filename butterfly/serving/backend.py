"""The contract between the API and the pipeline.

The API hands a tokenized, validated ``GenerationRequest`` to a ``Backend`` and iterates what
``generate`` yields: one ``TokenEvent`` per generated token, then exactly one ``Finished``. Closing the
iterator early (client gone, stop string matched) cancels the sequence and frees its KV cache on
every stage. A request the pipeline cannot take or complete raises ``ServingError`` with the HTTP
status and an OpenAI error code, before the first token or in place of the next one.

Must not: tokenize, render chat templates or know HTTP; those are the API's.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Literal, Protocol

from butterfly.engine.samplingparams import SamplingParams

__all__ = ["Backend", "Finished", "GenerationRequest", "ServingError", "TokenEvent"]


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: tuple[int, ...]
    max_tokens: int
    params: SamplingParams = field(default_factory=SamplingParams)
    # Generation ends (reason "stop") after any of these tokens; the model's end-of-sequence ids
    # are added by the API from the verified config.
    stop_token_ids: frozenset[int] = frozenset()


@dataclass(frozen=True)
class TokenEvent:
    token_id: int


@dataclass(frozen=True)
class Finished:
    reason: Literal["stop", "length"]
    prompt_tokens: int
    completion_tokens: int


class ServingError(Exception):
    """A request the pipeline refused or could not finish: ``status`` is the HTTP status (429 when
    the KV cache is full and the caller should retry, 503 when the pipeline is not serving or a stage
    died mid-request, 400 for a request the model cannot take), ``code`` OpenAI's error type."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


class Backend(Protocol):
    def generate(self, request: GenerationRequest) -> AsyncIterator[TokenEvent | Finished]: ...
