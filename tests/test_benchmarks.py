"""The benchmark scripts run: the GPU one (IF-I-XL-shaped stage I) as a narrow CPU smoke run,
so it is ready for the day a GPU is lent; its full-size config matches IF-I-XL's 4.3B."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


def test_if_i_xl_config_has_the_published_size():
    from gpu_if_xl import IF_I_XL_PARAMETERS, count_on_meta, if_i_xl_config

    count = count_on_meta(1.0)
    assert abs(count - IF_I_XL_PARAMETERS) < 0.01 * IF_I_XL_PARAMETERS, count
    config = if_i_xl_config()
    assert config["block_out_channels"] == [704, 1408, 2112, 2816]
    assert config["cross_attention_dim"] == 2816 and config["encoder_hid_dim"] == 4096


def test_gpu_benchmark_smoke_run_on_cpu_prints_throughput_and_flops(tmp_path, capsys):
    from gpu_if_xl import count_on_meta, main

    out = tmp_path / "result.json"
    assert main(["--scale", "0.0625", "--batch", "1", "--steps", "1", "--warmup", "1", "--rank", "4",
                 "--cpu", "--peak-tflops", "1", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["parameters"] > count_on_meta(0.0625)  # the base plus the LoRA weights
    assert 0 < result["trainable"] < 0.1 * result["parameters"]
    assert result["images_per_s"] > 0 and result["step_tflop"] > result["model_tflop"] / 3 > 0
    assert result["mfu"] > 0 and result["peak_gpu_memory_gib"] is None  # no GPU here
    assert "images_per_s" in capsys.readouterr().out


def test_text_share_counts_t5_xxl_as_two_flops_per_weight_per_token():
    from if_text_share import TOKENS, T5_V1_1_XXL, forward_flops

    flops = forward_flops()
    d, ff, layers = T5_V1_1_XXL["d_model"], T5_V1_1_XXL["d_ff"], T5_V1_1_XXL["num_layers"]
    heads = T5_V1_1_XXL["num_heads"] * T5_V1_1_XXL["d_kv"]
    weights = layers * (4 * d * heads + 3 * d * ff)   # q, k, v, o; gated feed-forward (wi_0, wi_1, wo)
    attention = layers * 2 * 2 * TOKENS * TOKENS * heads   # scores and weighted sum
    assert flops["text_forward"] == 2 * weights * TOKENS + attention
    # the UNet's forward at 64px is several times the caption's encoding (measured 2.88 vs 0.72 TFLOP)
    assert 3 < flops["unet_forward"] / flops["text_forward"] < 5


def test_attention_kernels_compared_compute_the_same_steps():
    """The kernel benchmark times interchangeable kernels: same weights, inputs and losses."""
    from attention_kernels import KERNELS, build_step

    def two_steps(kernel: str) -> list[float]:
        step = build_step("I", kernel, batch=2, rank=4)
        return [step(), step()]

    losses = {kernel: two_steps(kernel) for kernel in KERNELS}
    for kernel in KERNELS:
        assert losses[kernel] == pytest.approx(losses["sdpa"], rel=1e-4), kernel
    assert losses["sdpa"][0] != losses["sdpa"][1]  # the second step follows an optimizer update


def test_guidance_sweep_scores_every_variant_scale_and_prompt_set(tiny_cascade, tmp_path, capsys):
    from guidance_sweep import main

    out = tmp_path / "rows.json"
    assert main([str(tiny_cascade), "--guidance", "1,4", "--n", "2", "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["guidance"], r["set"]) for r in rows] == [
        ("base", 1.0, "domain"), ("base", 1.0, "general"), ("base", 4.0, "domain"), ("base", 4.0, "general")]
    assert all(0.0 <= r["scores"]["overall"] <= 1.0 and r["scores"]["n"] == 2 for r in rows)
    printed = capsys.readouterr().out
    assert "| base | 4 | general |" in printed


def test_guidance_sweep_by_count_scores_each_count_and_loads_adapter_folders(tiny_cascade, tmp_path, capsys):
    from guidance_sweep import main

    from finetune import adapters
    from finetune.cascade import Cascade
    from finetune.lora import attach_lora

    unet = Cascade.from_spec(str(tiny_cascade)).load_unet("I")
    attach_lora(unet, 2, 2.0, 0.0, ["to_q", "to_v"])
    adapters.save_adapter(unet, tmp_path / "ema", {"stage": "I"})
    out = tmp_path / "rows.json"
    # seed 1's first 8 domain prompts hold one-, two- and three-object scenes (6, 1 and 1)
    assert main([str(tiny_cascade), "--guidance", "1", "--n", "8", "--seed", "1", "--steps", "1",
                 "--by-count", "--adapters", str(tmp_path / "ema"), "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    sets = ["domain", "domain x1", "domain x2", "domain x3", "general", "general x1", "general x2", "general x3"]
    assert [(r["variant"], r["set"]) for r in rows] == [("base", s) for s in sets] + [(str(tmp_path / "ema"), s) for s in sets]
    whole = rows[0]
    assert sum(r["scores"]["n"] for r in rows[1:4]) == whole["scores"]["n"] == 8
    assert "position" in rows[1]["scores"] and "position" not in rows[2]["scores"]  # only singles have one
    assert {k: sum(v.values()) for k, v in whole["seen_counts"].items()} == {
        str(c): rows[c]["scores"]["n"] for c in (1, 2, 3)}
    assert "seen_counts" not in rows[1]
    assert "objects seen (base, guidance 1, domain): 1 -> " in capsys.readouterr().out


def test_guidance_sweep_refuses_a_folder_without_adapter(tiny_cascade, tmp_path, capsys):
    from guidance_sweep import main

    with pytest.raises(SystemExit) as stop:
        main([str(tiny_cascade), "--adapters", str(tmp_path)])
    assert stop.value.code == 2
    assert f"--adapters: {tmp_path} holds no pytorch_lora_weights.safetensors" in capsys.readouterr().err


def test_run_benchmark_bf16_and_compile_rows_are_recipes_the_kit_accepts(tmp_path):
    """--bf16 and --compile add kit rows for both stages whose recipes load with the asked
    train settings (a typo there would fail every child mid-benchmark)."""
    from argparse import Namespace

    from run_benchmark import benchmark_configs, kit_recipe

    from finetune.recipe import load_recipe

    base = len(benchmark_configs())
    extra = benchmark_configs(compile=True, bf16=True)[base:]
    assert sorted((e["stage"], e["train"]) for _, e in extra) == sorted(
        (stage, train) for stage in ("I", "II")
        for train in ("compile: true", "mixed_precision: bf16", "compile: true, mixed_precision: bf16"))
    assert len(benchmark_configs(bf16=True)) == base + 2
    (tmp_path / "data").mkdir()
    for _, settings in extra:
        args = Namespace(cascade="builtin:tiny", stage=settings["stage"], rank=4, batch=2, steps=3,
                         data=tmp_path / "data", contrastive="off", kit_train=f", {settings['train']}")
        path = tmp_path / f"{settings['stage']}-{len(settings['train'])}.yaml"
        path.write_text(kit_recipe(args, tmp_path))
        recipe = load_recipe(path).recipe
        assert recipe.cascade.stages == [settings["stage"]]
        assert recipe.train.compile == ("compile" in settings["train"])
        assert recipe.train.mixed_precision == ("bf16" if "bf16" in settings["train"] else "no")


def test_run_benchmark_ratios_are_paired_per_repetition():
    """A machine that runs everything twice as fast in one repetition must not move the
    ratios: each is taken within a repetition, and the table gives their median and range."""
    from run_benchmark import benchmark_configs, training_table

    configs = benchmark_configs()
    speed = [1.0, 2.0, 1.0]  # repetition 2 ran on a faster machine
    base = {("kit", "I"): 60.0, ("reference", "I"): 50.0, ("kit", "II"): 30.0, ("reference", "II"): 30.0}
    results = {}
    for i, (kind, extra) in enumerate(configs):
        rate = base.get((kind, extra["stage"]), 24.0 if extra["stage"] == "I" else 30.0)
        if kind == "kit" and "contrastive" in extra and extra["stage"] == "I":
            rate = 48.0  # 60 -> 48 images/s: each step takes 25% longer
        # kit rows without the term also run 10% faster in repetition 1 (their own noise)
        faster = 1.1 if kind == "kit" and "contrastive" not in extra else 1.0
        results[i] = [{"images_per_s": rate * s * (faster if r == 0 else 1.0), "peak_mb": 100.0,
                       "first_step_s": 1.0} for r, s in enumerate(speed)]
    table = "\n".join(training_table(configs, results))
    # kit I: 66, 120, 60 images/s against 50, 100, 50: ratios 1.32, 1.20, 1.20
    assert "| I | kit | 66.0 | 100 | 1.0 | 1.20x (1.20 to 1.32) |" in table
    assert "| I | reference | 50.0 | 100 | 1.0 | 1.00x (1.00 to 1.00) |" in table
    assert "| II | kit | 33.0 | 100 | 1.0 | 1.00x (1.00 to 1.10) |" in table
    # 48, 96, 48 images/s against 66, 120, 60: steps 37.5%, 25%, 25% longer
    assert "| I | contrastive cost | | | | +25% (+25% to +38%) of kit step time |" in table
    assert "| II | contrastive cost | | | | +0% (+0% to +10%) of kit step time |" in table


def test_fused_lora_benchmark_draws_what_the_unfused_adapter_draws(tiny_cascade, tmp_path, capsys):
    """Fusing is only a speed-up if it samples the same images; and the adapter it fuses must
    change them, or the comparison proves nothing."""
    import re

    import numpy as np
    from fused_lora import main, quickstart_like_adapters

    from finetune.cascade import Cascade
    from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings

    assert main(["--cascade", str(tiny_cascade), "--reps", "1", "--images", "2", "--steps", "2",
                 "--steps-II", "2"]) == 0
    out = capsys.readouterr().out
    assert "| fused (the kit) |" in out and "| unfused (peft layers) |" in out
    assert int(re.search(r"largest pixel difference between the two: (\d+) of 255", out).group(1)) <= 2

    cascade = Cascade.from_spec(str(tiny_cascade))
    folders = quickstart_like_adapters(cascade, ["I"], tmp_path, Path(__file__).parent.parent / "recipes" / "quickstart.yaml")
    settings = SampleSettings(steps=2, batch_size=2)
    base, fused = (np.asarray(CascadeSampler(cascade, variant, stages=["I"]).generate(["a red circle"] * 2, settings)[0],
                              dtype=np.int16)
                   for variant in (CascadeVariant(), CascadeVariant("adapted", adapters=folders)))
    assert np.abs(base - fused).max() > 8
