"""The served model's tokenizer: text to ids, ids back to text as they stream, and the chat template.

Owns ``ServingTokenizer``, built by ``load_serving_tokenizer`` from tokenizer.json (the ``tokenizers``
library), tokenizer_config.json (special tokens, the chat template) and config.json (context length,
end-of-sequence ids), each read through the manifest (``read_aux_file``) from the same source as the
weights, so weights are never paired with another model version's tokenizer or config.
``IncrementalDecoder`` turns a growing list of generated ids into text deltas; ``render_chat`` renders
the chat template the way transformers' ``apply_chat_template`` does (a sandboxed jinja2 with
trim_blocks/lstrip_blocks, ``raise_exception``, ``tojson``, ``strftime_now``).

Must not: know HTTP, sample, read files that the manifest does not cover, or import torch (it runs in
the supervisor's process): config.json's few keys it needs are read here, as the engine reads them.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from butterfly.weights.manifest import Manifest
from butterfly.weights.verify import read_aux_file, verified_model_config

if TYPE_CHECKING:
    import jinja2
    from tokenizers import Tokenizer

    from butterfly.weights.sources import Source

__all__ = [
    "ChatTemplateError",
    "IncrementalDecoder",
    "ServingTokenizer",
    "TokenizerError",
    "load_serving_tokenizer",
]

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
# Prompt tokens that precede the generated ones when decoding, so a tokenizer that renders a token
# differently at the start of a text (sentencepiece's leading space) streams what a whole decode says.
_DECODE_CONTEXT = 5
_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


class TokenizerError(ValueError):
    """The model directory's tokenizer files cannot be used; the message names the file and why."""


class ChatTemplateError(ValueError):
    """The chat template refused the messages (``raise_exception``) or failed to render."""


def _token_text(value: object) -> str | None:
    # tokenizer_config.json writes special tokens as strings or as AddedToken dicts.
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return str(value["content"])
    return None


def _int_key(raw: Mapping[str, object], key: str, where: str, default: int | None = None) -> int:
    value = raw.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise TokenizerError(f"{where}: {key} must be an integer >= 1, got {value!r}")
    return value


def _config_keys(raw: Mapping[str, object], where: str) -> tuple[int, int, tuple[int, ...]]:
    """(context length, vocabulary size, end-of-sequence ids) from config.json, with the engine's
    defaults (``butterfly.engine.config``): max_position_embeddings 2048, no eos_token_id."""
    context = _int_key(raw, "max_position_embeddings", where, 2048)
    vocab = _int_key(raw, "vocab_size", where)
    value = raw.get("eos_token_id")
    items = [] if value is None else value if isinstance(value, list) else [value]
    if not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab for v in items):
        raise TokenizerError(f"{where}: eos_token_id must be token ids below vocab_size, got {value!r}")
    return context, vocab, tuple(items)


def _compile_template(source: str) -> jinja2.Template:
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class _Generation(jinja2.ext.Extension):
        # transformers' {% generation %} marks the assistant's part; rendering keeps the body as is.
        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.Scope(body, lineno=lineno)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: object,
        ensure_ascii: bool = False,
        indent: int | None = None,
        separators: tuple[str, str] | None = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)


@dataclass(frozen=True)
class ServingTokenizer:
    """One model version's tokenizer, context length and end-of-sequence ids."""

    tokenizer: Tokenizer
    context_length: int
    """The longest sequence (prompt plus generated tokens) the model takes: max_position_embeddings."""
    eos_token_ids: frozenset[int]
    special_tokens: Mapping[str, str]
    chat_template: jinja2.Template | None
    vocab_size: int

    @classmethod
    def from_bytes(
        cls,
        tokenizer_json: bytes,
        tokenizer_config_json: bytes | None,
        model_config: Mapping[str, object],
        where: str = "<model>",
    ) -> ServingTokenizer:
        """Build from the files' bytes; ``where`` (the model's directory or URL) is named in errors."""
        from tokenizers import Tokenizer

        try:
            tok = Tokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for a malformed file
            raise TokenizerError(
                f"{where}/{TOKENIZER_FILE} is not a tokenizer the library can read: {e}"
            ) from None
        config: dict[str, object] = {}
        if tokenizer_config_json is not None:
            try:
                parsed = json.loads(tokenizer_config_json)
            except (UnicodeDecodeError, ValueError, RecursionError) as e:
                raise TokenizerError(f"{where}/{TOKENIZER_CONFIG_FILE} is not valid JSON: {e}") from None
            if not isinstance(parsed, dict):
                raise TokenizerError(f"{where}/{TOKENIZER_CONFIG_FILE} is not a JSON object")
            config = parsed
        context, vocab, eos_ids = _config_keys(model_config, f"{where}/config.json")
        special = {k: t for k in _SPECIAL_KEYS if (t := _token_text(config.get(k))) is not None}
        eos = set(eos_ids)
        if not eos and "eos_token" in special:
            eos_id = tok.token_to_id(special["eos_token"])
            if eos_id is not None:
                eos.add(eos_id)
        template_src = config.get("chat_template")
        if isinstance(template_src, list):
            # Newer files list named templates; the one named "default" is what transformers uses.
            named = {t.get("name"): t.get("template") for t in template_src if isinstance(t, Mapping)}
            template_src = named.get("default")
        template = None
        if template_src is not None:
            if not isinstance(template_src, str):
                raise TokenizerError(f"{where}/{TOKENIZER_CONFIG_FILE}: chat_template is not a string")
            import jinja2

            try:
                template = _compile_template(template_src)
            except jinja2.TemplateError as e:
                raise TokenizerError(
                    f"{where}/{TOKENIZER_CONFIG_FILE}: chat_template does not compile: {e}"
                ) from None
        return cls(
            tokenizer=tok,
            context_length=context,
            eos_token_ids=frozenset(eos),
            special_tokens=special,
            chat_template=template,
            vocab_size=vocab,
        )

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def render_chat(
        self, messages: Sequence[Mapping[str, object]], *, add_generation_prompt: bool = True
    ) -> str:
        """The chat template applied to ``messages``, as transformers' ``apply_chat_template`` renders
        it (tokenize=False). Raises ChatTemplateError when the model has no template or it refuses."""
        import jinja2

        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template (tokenizer_config.json has none)")
        try:
            return str(
                self.chat_template.render(
                    messages=[dict(m) for m in messages],
                    add_generation_prompt=add_generation_prompt,
                    tools=None,
                    documents=None,
                    **self.special_tokens,
                )
            )
        except jinja2.TemplateError as e:
            raise ChatTemplateError(f"the chat template refused the messages: {e}") from None
        except (TypeError, ValueError, KeyError, AttributeError) as e:
            raise ChatTemplateError(f"the chat template failed on these messages: {e}") from None

    def chat_prompt_ids(self, messages: Sequence[Mapping[str, object]]) -> list[int]:
        # apply_chat_template(tokenize=True) encodes without adding special tokens: the template
        # writes the ones it wants.
        return self.encode(self.render_chat(messages), add_special_tokens=False)


class IncrementalDecoder:
    """Text deltas of a generated sequence as its ids arrive.

    Decodes a short window (a few tokens before the last emitted text, and the new ones) rather than
    the whole sequence each time; a delta that would end in an incomplete UTF-8 character (U+FFFD)
    is held back until the next token completes it.
    """

    def __init__(self, tok: ServingTokenizer, prompt_ids: Sequence[int]) -> None:
        self._tok = tok
        self._ids: list[int] = list(prompt_ids[-_DECODE_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def push(self, token_id: int) -> str:
        """The text that ``token_id`` adds (possibly empty)."""
        self._ids.append(token_id)
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text) :]
            self._prefix = self._read
            self._read = len(self._ids)
            return delta
        return ""

    def flush(self) -> str:
        """Whatever is held back at the end of generation (a trailing incomplete character)."""
        prefix_text = self._tok.decode(self._ids[self._prefix : self._read])
        new_text = self._tok.decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return new_text[len(prefix_text) :] if len(new_text) > len(prefix_text) else ""


def load_serving_tokenizer(manifest: Manifest, src: Source) -> ServingTokenizer:
    """The tokenizer of ``manifest``'s model version from ``src``, every file verified against the
    manifest. Raises ManifestError (a file is not the version's), SourceError, or TokenizerError."""
    where = src.description.rstrip("/")
    config = verified_model_config(manifest, src)
    tokenizer_json = read_aux_file(manifest, src, TOKENIZER_FILE)
    tokenizer_config = (
        read_aux_file(manifest, src, TOKENIZER_CONFIG_FILE)
        if TOKENIZER_CONFIG_FILE in manifest.aux_files
        else None
    )
    return ServingTokenizer.from_bytes(tokenizer_json, tokenizer_config, config, where)
