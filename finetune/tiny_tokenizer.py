"""A small T5 tokenizer made locally (nothing downloaded).

It is a real `transformers.T5Tokenizer` (SentencePiece-style Unigram, T5's conventions:
pad=0, eos=1, unk=2, `</s>` appended), so diffusers' IF pipelines treat it exactly as the real
one. Its vocabulary is every printable ASCII character (so any caption tokenizes) plus whole
words of the synthetic world and common caption words, which score higher and so stay single
tokens.
"""
from __future__ import annotations

import string

SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]

BASE_WORDS = (
    "a an the one two three four five of on in at and with photo image picture drawing "
    "small large big tiny huge red green blue yellow orange purple pink cyan magenta white "
    "black gray grey brown teal navy circle square triangle star ring cross diamond heart "
    "hexagon pentagon moon left right top bottom center centre middle upper lower corner "
    "background style striped dotted outline flat plain sketch watercolor pixel shapes shape "
    "circles squares triangles stars rings crosses diamonds hearts hexagons"
).split()


def build_tokenizer(extra_words: list[str] | None = None):
    """Return a `transformers.T5Tokenizer` with a locally built vocabulary."""
    from transformers import T5Tokenizer

    vocab: list[tuple[str, float]] = [(tok, 0.0) for tok in SPECIAL_TOKENS]
    vocab.append(("\u2581", -2.0))  # the SentencePiece word-boundary marker alone
    seen = {tok for tok, _ in vocab}
    chars = [c for c in string.printable if not c.isspace()]
    for piece, score in [(c, -8.0) for c in chars] + [("\u2581" + c, -7.0) for c in chars]:
        if piece not in seen:
            vocab.append((piece, score))
            seen.add(piece)
    for word in BASE_WORDS + list(extra_words or []):
        piece = "\u2581" + word.lower()
        if piece not in seen:
            vocab.append((piece, -1.0))
            seen.add(piece)
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=77)
