"""Text-embedding cache: equals the stock pipeline's embedding, encodes each caption once,
is reused across runs, and never serves another encoder's embeddings."""
from __future__ import annotations

import torch

from finetune.cascade import Cascade
from finetune.text_cache import TextEmbeddingCache, tokenizer_settings


def test_cache_matches_pipeline_and_is_reused(tiny_cascade, tmp_path):
    from diffusers import IFPipeline

    cascade = Cascade.from_spec(str(tiny_cascade))
    tokenizer = cascade.load_tokenizer()
    loads = []

    def load():
        loads.append(1)
        return tokenizer, cascade.load_text_encoder()

    captions = ["A Red circle at the top left ", "two blue squares"]
    cache = TextEmbeddingCache(tmp_path, cascade.text_encoder_identity(), tokenizer_settings(tokenizer))
    cache.ensure(captions, load)
    assert cache.encoded_last == 3 and len(loads) == 1  # two captions + the empty one
    pipe = IFPipeline.from_pretrained(tiny_cascade / "stage_I")
    expected, _ = pipe.encode_prompt(captions, do_classifier_free_guidance=False, clean_caption=False)
    assert torch.allclose(cache.get(captions), expected, atol=1e-6)
    uncond, _ = pipe.encode_prompt("", do_classifier_free_guidance=False, clean_caption=False)
    assert torch.allclose(cache.get([""]), uncond, atol=1e-6)

    again = TextEmbeddingCache(tmp_path, cascade.text_encoder_identity(), tokenizer_settings(tokenizer))
    again.ensure(captions, load)
    assert again.encoded_last == 0 and len(loads) == 1  # a warm cache never loads the encoder

    other = TextEmbeddingCache(tmp_path, "another-encoder", tokenizer_settings(tokenizer))
    assert other.dir != cache.dir and len(other.missing(captions)) == 3
