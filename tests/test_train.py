"""End to end: a recipe trains, logs, checkpoints, resumes exactly (also after SIGKILL), and
refuses what would lose work."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from finetune.cli import main
from finetune.errors import UserError
from finetune.recipe import load_recipe
from finetune.train import run_recipe

ADAPTER = "pytorch_lora_weights.safetensors"


def _adapter(run: Path, stage="I") -> dict:
    return load_file(str(run / "adapters" / f"stage_{stage}" / ADAPTER))


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_two_phase_run_writes_everything(recipe_factory, tmp_path):
    path = recipe_factory(steps=3, general_steps=2)
    summary = run_recipe(load_recipe(path))
    run = summary.run_dir
    for name in ("resolved_recipe.yaml", "recipe.sha256", "versions.json", "metrics.jsonl",
                 "data_report.json", "finished.json"):
        assert (run / name).exists(), name
    assert (run / "recipe.sha256").read_text().strip() == load_recipe(path).hash
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["phase"], m["step"]) for m in metrics] == [
        ("general", 1), ("general", 2), ("domain", 1), ("domain", 2), ("domain", 3)]
    assert all(m["lr"] == 1e-4 and m["loss"] > 0 for m in metrics)
    general = load_file(str(run / "phases" / "general" / "stage_I" / ADAPTER))
    final = _adapter(run)
    assert _same(final, load_file(str(run / "phases" / "domain" / "stage_I" / ADAPTER)))
    assert not _same(final, general)  # the domain phase trained on top of the general one
    assert any(v.abs().sum() > 0 for k, v in general.items() if "lora_B" in k)


def test_lr_schedule_runs_across_phases(recipe_factory):
    path = recipe_factory(steps=2, general_steps=2)
    loaded = load_recipe(path, ["optim.lr.decay_every=3", "optim.lr.end=1.0e-6"])
    run = run_recipe(loaded).run_dir
    lrs = [json.loads(line)["lr"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([1e-4, 1e-4, 1e-4, 1e-5])  # global steps 0,1,2 | 3


def test_plan_reports_frozen_fraction(recipe_factory, capsys):
    path = recipe_factory()
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("I "))
    assert row.split()[-1].endswith("%") and float(row.split()[-1][:-1]) > 90


def test_refuses_when_too_little_is_frozen(recipe_factory, capsys):
    path = recipe_factory()
    code = main(["run", str(path), "--set", "lora.rank=512"])
    assert code == 2
    assert "below lora.min_frozen_fraction" in capsys.readouterr().err


def test_existing_run_is_never_overwritten_silently(recipe_factory, capsys):
    path = recipe_factory(steps=1)
    assert main(["run", str(path)]) == 0
    out = Path(load_recipe(path).recipe.output_dir)
    before = _adapter(out)
    assert main(["run", str(path)]) == 2
    assert "holds a finished run" in capsys.readouterr().err
    assert main(["run", str(path), "--resume", "--set", "seed=5"]) == 2
    assert "recipe changed" in capsys.readouterr().err
    assert _same(before, _adapter(out))


def test_resume_after_sigkill_gives_the_same_adapter(recipe_factory, tmp_path):
    ema = ", ema: {decay: 0.9}"  # the EMA must resume exactly too
    reference = recipe_factory(steps=6, general_steps=2, out="ref", name="ref.yaml", train=ema)
    run_recipe(load_recipe(reference))
    killed = recipe_factory(steps=6, general_steps=2, out="killed", name="killed.yaml", train=ema)
    out = Path(load_recipe(killed).recipe.output_dir)
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen([sys.executable, "-m", "finetune", "run", str(killed)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    target = out / "checkpoints"
    # Kill inside the domain phase, after its first checkpoint (step 2 of 6).
    while time.time() < deadline and not any(target.glob("domain-stage_I-step_000002")):
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "finished.json").exists(), "the run was killed before finishing"
    assert main(["run", str(killed), "--resume"]) == 0
    ref_out = Path(load_recipe(reference).recipe.output_dir)
    assert _same(_adapter(ref_out), _adapter(out))
    ema_file = Path("phases/domain/stage_I/ema") / ADAPTER
    assert _same(load_file(str(ref_out / ema_file)), load_file(str(out / ema_file)))
    assert not _same(load_file(str(out / ema_file)), _adapter(out))
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [(m["phase"], m["step"]) for m in metrics]
    assert len(steps) == len(set(steps)) == 8  # no duplicate lines after the resume


def test_corrupted_latest_checkpoint_falls_back(recipe_factory, capsys):
    from finetune.checkpoint import load_latest

    path = recipe_factory(steps=4, general_steps=1)
    loaded = load_recipe(path, ["train.keep_checkpoints=3"])
    run = run_recipe(loaded).run_dir
    ckpts = run / "checkpoints"
    latest = ckpts / "domain-stage_I-step_000004" / "state.safetensors"
    latest.write_bytes(latest.read_bytes()[:-10] + b"0123456789")
    messages = []
    found = load_latest(ckpts, "domain-stage_I", warn=messages.append)
    assert found.step == 2
    assert "corrupted" in messages[0]


def test_two_stages_train_and_stage_ii_adapter_loads(recipe_factory):
    from diffusers import IFSuperResolutionPipeline

    from finetune.cascade import Cascade

    path = recipe_factory(stages="[I, II]", steps=2, general_steps=1)
    loaded = load_recipe(path)
    run = run_recipe(loaded).run_dir
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {(m["phase"], m["stage"]) for m in metrics} == {
        ("general", "I"), ("general", "II"), ("domain", "I"), ("domain", "II")}
    assert all("loss_vlb" in m for m in metrics)
    cascade_dir = Cascade.from_spec(loaded.recipe.cascade.path).stage_dirs["II"]
    pipe = IFSuperResolutionPipeline.from_pretrained(cascade_dir)
    pipe.load_lora_weights(run / "adapters" / "stage_II")
    assert sum(1 for n, _ in pipe.unet.named_parameters() if "lora_" in n) == len(_adapter(run, "II"))


def test_per_stage_steps_and_batch(recipe_factory):
    path = recipe_factory(stages="[I, II]")
    loaded = load_recipe(path, ["phases.0.steps={I: 2, II: 1}", "phases.0.batch_size={I: 4, II: 2}",
                                "phases.1.steps=1"])
    run = run_recipe(loaded).run_dir
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(m["unit"], m["step"]) for m in metrics] == [
        ("general-stage_I", 1), ("general-stage_I", 2), ("general-stage_II", 1),
        ("domain-stage_I", 1), ("domain-stage_II", 1)]


def test_per_stage_steps_must_name_the_recipe_stages(recipe_factory, capsys):
    path = recipe_factory(stages="[I, II]")
    assert main(["validate", str(path), "--set", "phases.0.steps={I: 2}"]) == 2
    assert "give steps for every stage" in capsys.readouterr().err


@pytest.mark.parametrize("override, message", [
    ("lora.rank={I: 4}", "lora.rank: give a rank for every adapted stage (missing II)"),
    ("lora.alpha={I: 4, II: 4, III: 2}", "lora.alpha.III: stage III is not in cascade.stages"),
    ("lora.rank={I: 4, II: 0}", "lora.rank: Value error, expected a whole number of at least 1"),
    ("lora.alpha={I: 4, II: -1}", "lora.alpha: Value error, expected a number above 0"),
])
def test_per_stage_lora_settings_must_name_the_recipe_stages(recipe_factory, capsys, override, message):
    path = recipe_factory(stages="[I, II]")
    assert main(["validate", str(path), "--set", override]) == 2
    assert message in capsys.readouterr().err


def test_full_method_trains_every_weight_resumes_and_writes_a_pipeline_folder(recipe_factory):
    from diffusers import IFPipeline

    from conftest import rewind_unit
    from finetune.cascade import Cascade

    path = recipe_factory(steps=4, general_steps=1, extra="method: full",
                          train=", ema: {decay: 0.9, export: ema}")
    loaded = load_recipe(path)
    run = run_recipe(loaded).run_dir
    stage_dir = run / "cascade" / "stage_I"
    trained = IFPipeline.from_pretrained(stage_dir, safety_checker=None, feature_extractor=None,
                                         watermarker=None, requires_safety_checker=False).unet
    base = Cascade.from_spec(loaded.recipe.cascade.path).load_unet("I")
    changed = [n for n, p in trained.named_parameters() if not p.equal(dict(base.named_parameters())[n])]
    assert len(changed) > 0.9 * len(list(base.parameters()))
    weights = "unet/diffusion_pytorch_model.safetensors"
    exported = load_file(str(run / "phases/domain/stage_I" / weights))
    raw = load_file(str(run / "phases/domain/stage_I/raw" / weights))
    assert not _same(exported, raw)  # export: ema puts the average first, raw beside it

    # Forget the domain phase's last checkpoint and result, then resume from its step 2.
    rewind_unit(run, "domain-stage_I", "domain", "domain-stage_I-step_000004")
    assert main(["run", str(path), "--resume"]) == 0
    assert _same(exported, load_file(str(run / "phases/domain/stage_I" / weights)))


def test_metrics_also_go_to_wandb_offline_and_tensorboard(recipe_factory, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    path = recipe_factory(steps=2, general_steps=2,
                          extra="logging: {wandb: {enabled: true, mode: offline}, tensorboard: true}")
    run = run_recipe(load_recipe(path)).run_dir
    offline = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert offline and offline[0].stat().st_size > 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    losses = events.Scalars("domain-stage_I/loss")
    assert [e.step for e in losses] == [3, 4]  # after the general phase's 2 steps


def test_missing_logging_package_is_a_clear_error(recipe_factory, monkeypatch, capsys):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError("No module named 'wandb'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    monkeypatch.delitem(sys.modules, "wandb", raising=False)
    path = recipe_factory(steps=1, extra="logging: {wandb: {enabled: true}}")
    from finetune.loggers import MetricSinks

    with pytest.raises(UserError, match="logging.wandb: the wandb package is not installed"):
        MetricSinks(load_recipe(path).recipe.logging, path.parent, {})


@pytest.mark.parametrize("setting,package", [("optim.name=adamw8bit", "bitsandbytes"),
                                             ("train.attention=xformers", "xformers"),
                                             ("logging.wandb.enabled=true", "wandb")])
def test_optional_packages_asked_for_but_missing_fail_before_anything_is_written(
        recipe_factory, monkeypatch, capsys, setting, package):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    path = recipe_factory(steps=1)
    assert main(["run", str(path), "--set", setting]) == 2
    err = capsys.readouterr().err
    assert f"needs the {package} package, which is not installed" in err and "--set: " in err
    assert not Path(load_recipe(path).recipe.output_dir).exists()


def test_validation_loss_progress_grids_and_phase_overrides(recipe_factory):
    path = recipe_factory(stages="[I, II]", steps=4, general_steps=1,
                          train=", validate_every: 2, sample_every: 4, sample_prompts: ['a red star']")
    overrides = ["phases.1.data.validation_fraction=0.3", "eval.sample.steps=2", "eval.sample.steps_II=2"]
    run = run_recipe(load_recipe(path, overrides)).run_dir
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [(r["unit"], r["step"]) for r in rows if "val_loss" in r]
    assert val == [("domain-stage_I", 2), ("domain-stage_I", 4), ("domain-stage_II", 2), ("domain-stage_II", 4)]
    report = json.loads((run / "data_report.json").read_text())
    assert report["domain"]["validation"] > 0 and report["general"]["validation"] == 0
    for unit in ("general-stage_I", "domain-stage_I", "general-stage_II", "domain-stage_II"):
        last = 1 if unit.startswith("general") else 4
        assert (run / "samples" / "progress" / f"{unit}-step_{last:06d}.png").exists(), unit

    # the same weights give the same validation loss (fixed draws)
    again = run_recipe(load_recipe(path, overrides + ["output_dir=" + str(run) + "-again"])).run_dir
    rows2 = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [r["val_loss"] for r in rows if "val_loss" in r] == pytest.approx(
        [r["val_loss"] for r in rows2 if "val_loss" in r], rel=1e-5)


def test_phase_loss_override_changes_training(recipe_factory):
    path = recipe_factory(steps=2, general_steps=1)
    plain = run_recipe(load_recipe(path)).run_dir
    dropped = run_recipe(load_recipe(path, ["phases.1.loss.caption_dropout=1.0",
                                            f"output_dir={plain}-dropped"])).run_dir
    assert not _same(_adapter(plain), _adapter(dropped))
    general = Path("phases/general/stage_I") / ADAPTER
    assert _same(load_file(str(plain / general)), load_file(str(dropped / general)))


def test_min_snr_weighting_reaches_the_training_loss(recipe_factory):
    """train.snr_gamma weights the loss that is trained; the logged loss_pred stays the plain
    MSE, so the first step (same weights, same draws) logs the same loss_pred either way."""
    def first_step(out, train=""):
        run = run_recipe(load_recipe(recipe_factory(steps=1, out=out, name=out + ".yaml", train=train))).run_dir
        return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])

    # gamma far below the usual 5 so that every drawn timestep is re-weighted (an epsilon
    # loss is only changed where SNR > gamma)
    plain, weighted = first_step("plain"), first_step("snr", ", snr_gamma: 0.01")
    assert weighted["loss_pred"] == pytest.approx(plain["loss_pred"], rel=1e-6)
    assert plain["loss"] == pytest.approx(plain["loss_pred"] + plain["loss_vlb"], rel=1e-5)
    assert abs(weighted["loss"] - (weighted["loss_pred"] + weighted["loss_vlb"])) > 1e-3 * plain["loss"]


def test_train_compile_wraps_the_trained_unet_and_exports_the_plain_one(recipe_factory, monkeypatch):
    """Real inductor compilation takes minutes on this CPU (measured in docs/performance.md):
    the test compiles with dynamo's eager backend, which wraps the UNet the same way."""
    import torch

    compiled = []
    real_compile = torch.compile

    def eager_compile(model, *args, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    path = recipe_factory(steps=2, train=", compile: true")
    assert main(["run", str(path)]) == 0
    assert compiled == ["UNet2DConditionModel", "UNet2DConditionModel"]  # one per unit
    adapter = load_file(str(path.parent / "run" / "adapters/stage_I/pytorch_lora_weights.safetensors"))
    assert adapter and not any("_orig_mod" in k for k in adapter)


@pytest.fixture
def fp32_adapter(recipe_factory):
    path = recipe_factory(steps=2, batch=4, out="baseline", name="baseline.yaml")
    assert main(["run", str(path)]) == 0
    return load_file(str(path.parent / "baseline" / "adapters/stage_I/pytorch_lora_weights.safetensors"))


@pytest.mark.parametrize("train,tolerance", [
    (", gradient_checkpointing: true", 1e-6),  # recomputes activations: the same maths
    (", mixed_precision: bf16", 5e-3),         # autocast, bf16 frozen base, fp32 LoRA weights
])
def test_memory_features_train_the_same_adapter(recipe_factory, fp32_adapter, train, tolerance):
    path = recipe_factory(steps=2, batch=4, train=train)
    # A process picks its mixed precision once (accelerate's state is a singleton): run the
    # CLI in its own process, as a user does.
    proc = subprocess.run([sys.executable, "-m", "finetune", "run", str(path)], capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    got = load_file(str(path.parent / "run" / "adapters/stage_I/pytorch_lora_weights.safetensors"))
    assert got.keys() == fp32_adapter.keys()
    assert all(v.dtype == fp32_adapter[k].dtype for k, v in got.items())  # saved in the weights' dtype
    diff = max((got[k] - fp32_adapter[k]).abs().max().item() for k in got)
    moved = max((fp32_adapter[k]).abs().max().item() for k in got if "lora_B" in k)
    assert moved > 0, "the baseline trained"
    assert diff <= tolerance, diff


def test_gradient_accumulation_matches_the_same_global_batch(recipe_factory, fp32_adapter):
    path = recipe_factory(steps=2, batch=4, extra="", train="")
    assert main(["run", str(path), "--set", "optim.grad_accum=2"]) == 0
    got = load_file(str(path.parent / "run" / "adapters/stage_I/pytorch_lora_weights.safetensors"))
    # two micro-batches of 2 sum to the gradient of one batch of 4, up to float summation
    # order (~1e-6 after Adam's normalisation); a micro-batch lost or counted twice moves the
    # update by about the learning rate (1e-4)
    assert max((got[k] - fp32_adapter[k]).abs().max().item() for k in got) < 1e-5


def test_replay_mixes_earlier_phases_data_into_a_phase(recipe_factory, synth_general, synth_domain, cache_dir):
    """phases[].replay: about `fraction` of the phase's set is rehearsal of earlier phases'
    data, drawn once (seeded) at preparation, so the run is reproducible and resumable."""
    import torch

    from finetune.phase_data import load_phase_data
    from finetune.recipe.schema import DataSpec

    general = load_phase_data(DataSpec(path=str(synth_general)), [32], cache_dir, "general")
    domain = load_phase_data(DataSpec(path=str(synth_domain), validation_fraction=0.2), [32], cache_dir, "domain")
    mixed, count = domain.with_replay([general], 0.25, seed=1)
    own = len(domain.captions)
    assert count == round(own / 3) and len(mixed.captions) == own + count
    assert mixed.captions[:own] == domain.captions and mixed.validation is domain.validation
    replayed = mixed.wheres[own:]
    assert set(replayed) <= set(general.wheres) and len(set(replayed)) == count  # no repeats while the pool lasts
    index = {w: i for i, w in enumerate(general.wheres)}
    assert torch.equal(mixed.pixels[32][own:], general.pixels[32][[index[w] for w in replayed]])
    assert domain.with_replay([general], 0.25, seed=1)[0].wheres == mixed.wheres
    assert domain.with_replay([general], 0.25, seed=2)[0].wheres != mixed.wheres
    many, count = domain.with_replay([general], 0.9, seed=1)  # more than the pool: cycles
    assert count > len(general.captions) and set(many.wheres[own:]) == set(general.wheres)
    assert mixed.fingerprint != domain.fingerprint

    path = recipe_factory(steps=3, general_steps=1)
    plain = run_recipe(load_recipe(path)).run_dir
    replay = ["phases.1.replay={fraction: 0.5, phases: [general]}"]
    run = run_recipe(load_recipe(path, replay + [f"output_dir={plain}-replay"])).run_dir
    report = json.loads((run / "data_report.json").read_text())["domain"]
    assert report["replay"] == {"phases": ["general"], "fraction": 0.5, "samples": report["usable"]}
    assert not _same(_adapter(plain), _adapter(run))
    again = run_recipe(load_recipe(path, replay + [f"output_dir={plain}-again"])).run_dir
    assert _same(_adapter(run), _adapter(again))


def test_adamw8bit_keeps_8_bit_state_checkpoints_it_and_resumes_exactly(recipe_factory):
    """bitsandbytes' AdamW8bit runs on CPU too (bitsandbytes >= 0.49), so the optimizer switch,
    its 8-bit state in checkpoints and an exact resume are tested here, not only on GPU."""
    pytest.importorskip("bitsandbytes")
    from conftest import rewind_unit

    path = recipe_factory(steps=4, general_steps=1)
    run = run_recipe(load_recipe(path, ["optim.name=adamw8bit"])).run_dir
    state = load_file(str(run / "checkpoints" / "domain-stage_I-step_000002" / "state.safetensors"))
    # bitsandbytes keeps its state under one nested key; every moment reaches the
    # checkpoint as a tensor (LoRA matrices this small keep 32-bit moments: bitsandbytes
    # quantises tensors of 4096 elements or more)
    moments = [k for k in state if k.startswith("optim.") and "__bnb_optimizer_quant_state__/state1" in k]
    assert len(moments) == len([k for k in _adapter(run)]), sorted(state)[-4:]
    manifest = (run / "checkpoints" / "domain-stage_I-step_000002" / "manifest.json").read_text()
    assert "tensor(" not in manifest  # no tensor stringified into the JSON side
    plain = run_recipe(load_recipe(path, [f"output_dir={run}-fp32"])).run_dir
    assert not _same(_adapter(run), _adapter(plain))  # the switch changes the optimizer
    finished = _adapter(run)
    rewind_unit(run, "domain-stage_I", "domain", "domain-stage_I-step_000004")
    assert main(["run", str(path), "--set", "optim.name=adamw8bit", "--resume"]) == 0
    assert _same(finished, _adapter(run))


def test_8_bit_optimizer_state_round_trips_through_a_checkpoint():
    """Large tensors get uint8 moments in bitsandbytes; flattened to safetensors + JSON and
    back, the optimizer continues exactly as the uninterrupted one."""
    bnb = pytest.importorskip("bitsandbytes")
    from finetune.checkpoint import optimizer_from_tensors, optimizer_to_tensors

    def steps(param, optimizer, n):
        for i in range(n):
            optimizer.zero_grad()
            (param.sin() * (i + 1)).sum().backward()
            optimizer.step()

    torch.manual_seed(0)
    param = torch.nn.Parameter(torch.randn(64, 128))  # 8192 elements: quantised
    optimizer = bnb.optim.AdamW8bit([param], lr=1e-2)
    steps(param, optimizer, 3)
    tensors, meta = optimizer_to_tensors(optimizer)
    assert any(v.dtype == torch.uint8 for v in tensors.values())
    json.dumps(meta)  # the rest is plain JSON
    copy = torch.nn.Parameter(param.detach().clone())
    restored = bnb.optim.AdamW8bit([copy], lr=1e-2)
    optimizer_from_tensors(restored, tensors, json.loads(json.dumps(meta)))
    steps(param, optimizer, 2)
    steps(copy, restored, 2)
    assert torch.equal(param, copy)


def test_mixed_precision_on_gpu_stores_the_frozen_base_in_half_and_trains_lora_in_fp32(recipe_factory, tiny_cascade):
    """The GPU memory saving (checked on the method; the CUDA forward runs in the GPU
    benchmark). On CPU the base stays fp32: CPU autocast runs layer norms in the weights'
    dtype, and a bf16 base fails there."""
    from finetune.cascade import Cascade
    from finetune.methods import make_method

    recipe = load_recipe(recipe_factory(), ["train.mixed_precision=bf16"]).recipe
    unet = Cascade.from_spec(str(tiny_cascade)).load_unet("I")
    method = make_method(recipe, "cuda")
    method.prepare(unet, "I")
    trainable = {id(p) for p in method.trainable(unet)}
    assert trainable and all(p.dtype == torch.float32 for p in method.trainable(unet))
    frozen = [p for p in unet.parameters() if id(p) not in trainable]
    assert frozen and all(p.dtype == torch.bfloat16 and not p.requires_grad for p in frozen)
    for device, settings in (("cpu", recipe), ("cuda", load_recipe(recipe_factory(name="fp32.yaml")).recipe)):
        unet = Cascade.from_spec(str(tiny_cascade)).load_unet("I")
        make_method(settings, device).prepare(unet, "I")
        assert all(p.dtype == torch.float32 for p in unet.parameters()), device


def test_xformers_switch_reaches_every_trained_unet(recipe_factory, monkeypatch):
    """xformers is CUDA-only, so the kernels cannot run here: this checks the kit's side, that
    `train.attention: xformers` passes validation when the package is present and turns the
    kernels on for each UNet that trains, through diffusers' own switch."""
    import importlib.util

    from diffusers import UNet2DConditionModel

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: real("json") if name == "xformers" else real(name, *a))
    switched = []
    monkeypatch.setattr(UNet2DConditionModel, "enable_xformers_memory_efficient_attention",
                        lambda self, *a, **k: switched.append(type(self).__name__))
    path = recipe_factory(steps=1, stages="[I, II]")
    assert main(["run", str(path), "--set", "train.attention=xformers", "--set", "eval.prompt_sets={}"]) == 0
    assert len(switched) == 4  # general and domain phases, stages I and II


def test_a_velocity_cascade_is_trained_on_velocity_and_keeps_its_scheduler(recipe_factory, tiny_cascade, tmp_path):
    from conftest import copy_predicting
    from finetune.cascade import Cascade
    from finetune.objective import stage_objective
    from finetune.recipe.schema import TrainSpec

    velocity_cascade = copy_predicting(tiny_cascade, tmp_path / "velocity", "v_prediction")
    by_velocity = stage_objective(Cascade.from_spec(str(velocity_cascade)), "I", TrainSpec())
    by_noise = stage_objective(Cascade.from_spec(str(tiny_cascade)), "I", TrainSpec())
    x0 = torch.rand(2, 3, 16, 16) * 2 - 1
    _, t, noise, _, _ = by_velocity.unet_inputs(x0, by_velocity.draw(tuple(x0.shape), torch.Generator().manual_seed(0)))
    exact = torch.cat([by_velocity.scheduler.get_velocity(x0, noise, t), torch.zeros_like(x0)], dim=1)
    assert by_velocity.prediction_error(exact, x0, noise, t).max() < 1e-10
    assert by_noise.prediction_error(exact, x0, noise, t).min() > 1e-2

    path = recipe_factory(steps=2, general_steps=1, extra="method: full")
    path.write_text(path.read_text().replace(str(tiny_cascade), str(velocity_cascade)))
    run = run_recipe(load_recipe(path)).run_dir
    saved = json.loads((run / "cascade/stage_I/scheduler/scheduler_config.json").read_text())
    assert saved["prediction_type"] == "v_prediction"  # diffusers samples it as it was trained
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()
              if '"loss"' in line]
    assert losses and all(math.isfinite(x) for x in losses)


def test_a_prediction_type_the_kit_cannot_train_is_refused(recipe_factory, tiny_cascade, tmp_path, capsys):
    from conftest import copy_predicting

    sample_cascade = copy_predicting(tiny_cascade, tmp_path / "sample", "sample")
    path = recipe_factory(steps=2)
    path.write_text(path.read_text().replace(str(tiny_cascade), str(sample_cascade)))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert "prediction_type 'sample'" in err and "scheduler_config.json" in err and "Traceback" not in err
