"""What the text-embedding cache saves per training step: encoding a batch of captions with a
frozen T5 encoder (what a plain loop does every step) against reading the same embeddings from
the kit's cache. The encoder is T5 v1.1 shaped (random weights: the cost does not depend on
them); `--size` picks small, base or large. T5-XXL, which IF uses, is ~4.7B parameters, about
15x the large one; it does not fit this benchmark's time on a CPU.

    python benchmarks/text_cache.py --size large --batch 16
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

SIZES = {  # T5 v1.1 encoder shapes
    "small": dict(d_model=512, d_ff=1024, num_layers=8, num_heads=6, d_kv=64),
    "base": dict(d_model=768, d_ff=2048, num_layers=12, num_heads=12, d_kv=64),
    "large": dict(d_model=1024, d_ff=2816, num_layers=24, num_heads=16, d_kv=64),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="base")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()

    import torch
    from transformers import T5Config, T5EncoderModel

    from data_tools.synth import prompt_set
    from finetune.text_cache import TextEmbeddingCache, encode_captions
    from finetune.tiny_tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    config = T5Config(vocab_size=len(tokenizer), feed_forward_proj="gated-gelu", is_encoder_decoder=False,
                      **SIZES[args.size])
    encoder = T5EncoderModel(config).eval()
    params = sum(p.numel() for p in encoder.parameters())
    captions = [s.caption() for s in prompt_set("general", args.batch * (args.reps + 1), seed=3)]
    cache = TextEmbeddingCache(Path(tempfile.mkdtemp()), f"bench-{args.size}", {"max_length": 77})
    started = time.perf_counter()
    cache.ensure(captions, lambda: (tokenizer, encoder))
    fill = time.perf_counter() - started
    encode, lookup = [], []
    for rep in range(args.reps):
        batch = captions[rep * args.batch:(rep + 1) * args.batch]
        t0 = time.perf_counter()
        with torch.no_grad():
            encode_captions(tokenizer, encoder, batch)
        t1 = time.perf_counter()
        cache.get(batch)
        t2 = time.perf_counter()
        encode.append(t1 - t0)
        lookup.append(t2 - t1)
    e, c = statistics.median(encode), statistics.median(lookup)
    print(f"T5 v1.1 {args.size} encoder ({params / 1e6:.0f}M parameters), batch {args.batch}, "
          f"median of {args.reps}, {torch.get_num_threads()} threads")
    print(f"| encode every step | read from the cache | saved per step | one-off cache fill ({len(captions)} captions) |")
    print("|---|---|---|---|")
    print(f"| {e * 1000:.0f} ms | {c * 1000:.1f} ms | {e - c:.2f} s ({e / c:.0f}x) | {fill:.1f} s |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
