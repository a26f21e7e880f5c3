"""Text-embedding cache: each unique caption is encoded once by the frozen encoder.

Entries live under `<cache>/text_embeds/<key>/` where the key hashes the encoder identity
(config + weight fingerprint) and the tokenizer settings, so a different encoder or tokenizer
never reuses stale embeddings. Each batch of newly encoded captions is one safetensors shard
(tensor name = sha1 of the caption), written atomically; shards are opened lazily, so a
large cache is never loaded whole. The empty caption is always cached: caption dropout for
classifier-free guidance trains with it.

Captions are prepared exactly as `IFPipeline.encode_prompt` does without caption cleaning
(lower-cased, stripped, 77 tokens, padded to max length, attention mask passed to T5), so a
cached embedding equals what the stock pipeline computes at sampling time.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .atomic import atomic_path

MAX_LENGTH = 77  # IF's T5 was trained with 77 tokens; IFPipeline hard-codes it


def prepare_caption(caption: str) -> str:
    """IFPipeline's `_text_preprocessing(clean_caption=False)`."""
    return caption.lower().strip()


def caption_key(caption: str) -> str:
    return hashlib.sha1(prepare_caption(caption).encode("utf-8")).hexdigest()


def tokenizer_settings(tokenizer) -> dict:
    return {"class": type(tokenizer).__name__, "vocab_size": len(tokenizer),
            "max_length": MAX_LENGTH, "padding": "max_length", "vocab_hash": hashlib.sha1(
                json.dumps(sorted(tokenizer.get_vocab().items())).encode()).hexdigest()[:16]}


@torch.no_grad()
def encode_captions(tokenizer, text_encoder, captions: list[str], device="cpu") -> torch.Tensor:
    prepared = [prepare_caption(c) for c in captions]
    tokens = tokenizer(prepared, padding="max_length", max_length=MAX_LENGTH, truncation=True,
                       add_special_tokens=True, return_tensors="pt")
    out = text_encoder(tokens.input_ids.to(device), attention_mask=tokens.attention_mask.to(device))
    return out[0]


class TextEmbeddingCache:
    def __init__(self, root: Path, encoder_identity: str, tokenizer_config: dict):
        key_src = json.dumps({"encoder": encoder_identity, "tokenizer": tokenizer_config},
                             sort_keys=True)
        self.key = hashlib.sha256(key_src.encode()).hexdigest()[:20]
        self.dir = Path(root) / "text_embeds" / self.key
        self._index: dict[str, Path] | None = None
        self._handles: dict[Path, object] = {}
        self.encoded_last = 0  # how many captions the last `ensure` had to encode

    def _load_index(self) -> dict[str, Path]:
        if self._index is None:
            self._index = {}
            for shard in sorted(self.dir.glob("shard-*.safetensors")):
                with safe_open(shard, "pt") as handle:
                    for name in handle.keys():
                        self._index[name] = shard
        return self._index

    def reload(self) -> None:
        """Forget the shard index (another process may have written shards)."""
        self._index = None
        self._handles.clear()

    def missing(self, captions: list[str]) -> list[str]:
        index = self._load_index()
        seen, out = set(), []
        for caption in list(captions) + [""]:
            key = caption_key(caption)
            if key not in index and key not in seen:
                seen.add(key)
                out.append(caption)
        return out

    def ensure(self, captions: list[str], load_encoder, batch_size: int = 64, device="cpu",
               progress=None) -> None:
        """Encode and store the captions not yet cached. `load_encoder()` returns
        (tokenizer, text_encoder) and is only called when something is missing, so a warm
        cache never loads the encoder."""
        todo = self.missing(captions)
        self.encoded_last = len(todo)
        if not todo:
            return
        tokenizer, encoder = load_encoder()
        encoder.to(device)
        self.dir.mkdir(parents=True, exist_ok=True)
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            embeds = encode_captions(tokenizer, encoder, chunk, device).cpu()
            tensors = {caption_key(c): e.contiguous() for c, e in zip(chunk, embeds)}
            digest = hashlib.sha1("".join(sorted(tensors)).encode()).hexdigest()[:16]
            shard = self.dir / f"shard-{digest}.safetensors"
            with atomic_path(shard) as tmp:
                save_file(tensors, str(tmp))
            for name in tensors:
                self._load_index()[name] = shard
            if progress is not None:
                progress.update(len(chunk))

    def get(self, captions: list[str]) -> torch.Tensor:
        index = self._load_index()
        rows = []
        for caption in captions:
            shard = index[caption_key(caption)]
            handle = self._handles.get(shard)
            if handle is None:
                handle = self._handles[shard] = safe_open(shard, "pt")
            rows.append(handle.get_tensor(caption_key(caption)))
        return torch.stack(rows)
