"""The test model's tokenizer: a small byte-level BPE built offline with the ``tokenizers`` library.

Owns ``tokenizer_files(vocab_size)``: the bytes of ``tokenizer.json`` and ``tokenizer_config.json``
(with a ChatML-style chat template) for a model of ``vocab_size`` tokens, identical for identical
arguments, and the special tokens' ids that go into config.json.

The BPE is trained on a text embedded here, then its vocabulary is filled up to exactly
``vocab_size`` with tokens made of two trained ones (reachable by no merge, so encoding never yields
them, but every id the model can sample decodes to text). A model of at least
``BYTE_LEVEL_MIN_VOCAB`` tokens gets all 256 byte symbols, so any text encodes; a smaller one keeps
the most frequent characters and maps the rest to ``<unk>``.

Must not: write files (``testmodel`` does) or depend on transformers.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from tokenizers import Tokenizer

__all__ = ["BOS", "BYTE_LEVEL_MIN_VOCAB", "EOS", "SPECIAL_TOKENS", "TokenizerFiles", "tokenizer_files"]

UNK, BOS, EOS, IM_START, IM_END = "<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (UNK, BOS, EOS, IM_START, IM_END)
_MIN_VOCAB = len(SPECIAL_TOKENS) + 16
BYTE_LEVEL_MIN_VOCAB = len(SPECIAL_TOKENS) + 256 + 64

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_CORPUS = """\
Butterfly turns a few machines into one inference cluster. Each node finds its peers, the nodes
elect a coordinator, and the coordinator splits the model's layers between them by capacity. A node
streams only its own layers from the store, checks every chunk as it lands, and proves with a Merkle
tree that it holds exactly the weights of one model version. Only then does the cluster serve.

The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs. How vexingly
quick daft zebras jump! Sphinx of black quartz, judge my vow. The five boxing wizards jump quickly.

A request enters at any node. The first stage embeds the prompt, each stage runs its blocks, and the
last stage turns the final hidden state into logits and samples the next token. The token goes back
to the node that took the request, which streams it to the client. Many requests share each step:
new ones join at token boundaries and finished ones leave.

Hello, world. What is the capital of France? Paris is the capital of France. Tell me a story about
a small robot who learns to paint. Once upon a time, in a quiet town by the sea, there lived a robot
named Ada. She liked the colours of the morning and the sound of the waves. Numbers: 0 1 2 3 4 5 6
7 8 9 10 42 100 2024. Punctuation: ( ) [ ] { } < > ; : , . ! ? ' " - _ / \\ | @ # $ % ^ & * + = ~ `.
def add(a, b):
    return a + b
"""


class TokenizerFiles:
    """The files of the test tokenizer and the ids config.json names."""

    def __init__(self, tokenizer_json: bytes, tokenizer_config_json: bytes, bos_id: int, eos_ids: list[int]):
        self.tokenizer_json = tokenizer_json
        self.tokenizer_config_json = tokenizer_config_json
        self.bos_id = bos_id
        self.eos_ids = eos_ids

    def files(self) -> dict[str, bytes]:
        return {"tokenizer.json": self.tokenizer_json, "tokenizer_config.json": self.tokenizer_config_json}


def _json_bytes(obj: object) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _corpus(vocab_size: int) -> list[str]:
    """The training text; for a vocabulary too small for every byte, only its most frequent
    characters (ties by code point, so the choice never depends on hashing order)."""
    lines = _CORPUS.splitlines(keepends=True)
    if vocab_size >= BYTE_LEVEL_MIN_VOCAB:
        return lines
    counts: dict[str, int] = {}
    for ch in _CORPUS:
        counts[ch] = counts.get(ch, 0) + 1
    room = vocab_size - len(SPECIAL_TOKENS) - (vocab_size - len(SPECIAL_TOKENS)) // 4
    keep = set(sorted(counts, key=lambda c: (-counts[c], c))[:room])
    return ["".join(c for c in line if c in keep) for line in lines]


def _train(vocab_size: int) -> Tokenizer:
    # Imported here: every process that imports butterfly.weights would otherwise load the library.
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if vocab_size >= BYTE_LEVEL_MIN_VOCAB else []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=alphabet,
        show_progress=False,
    )
    tok.train_from_iterator(_corpus(vocab_size), trainer)
    return tok


def _fill(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    """Rebuild the BPE with its vocabulary filled up to ``vocab_size`` by pairs of trained tokens."""
    from tokenizers import Tokenizer, models

    state = json.loads(tok.to_str())
    vocab: dict[str, int] = state["model"]["vocab"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in state["model"]["merges"]]
    base = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1]) if t not in SPECIAL_TOKENS]
    pairs = ((a + b) for a in base for b in base)
    while len(vocab) < vocab_size:
        token = next(pairs)
        if token not in vocab:
            vocab[token] = len(vocab)
    out = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=UNK))
    out.pre_tokenizer = tok.pre_tokenizer
    out.decoder = tok.decoder
    out.add_special_tokens(list(SPECIAL_TOKENS))
    return out


def tokenizer_files(vocab_size: int, model_max_length: int) -> TokenizerFiles:
    """The tokenizer of a test model with ``vocab_size`` tokens (at least 21)."""
    if vocab_size < _MIN_VOCAB:
        raise ValueError(f"a test model with a tokenizer needs vocab >= {_MIN_VOCAB}, got {vocab_size}")
    tok = _fill(_train(vocab_size), vocab_size)
    assert tok.get_vocab_size() == vocab_size
    ids: dict[str, int] = {}
    for t in SPECIAL_TOKENS:
        i = tok.token_to_id(t)
        assert i is not None
        ids[t] = i
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "bos_token": BOS,
        "eos_token": IM_END,
        "unk_token": UNK,
        "pad_token": EOS,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    return TokenizerFiles(
        tokenizer_json=(tok.to_str(pretty=True) + "\n").encode("utf-8"),
        tokenizer_config_json=_json_bytes(config),
        bos_id=ids[BOS],
        eos_ids=[ids[EOS], ids[IM_END]],
    )
