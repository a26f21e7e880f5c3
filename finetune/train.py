"""The training loop: setup, then for each phase and each stage one unit of LoRA training
(resume, steps, checkpoints, adapter), then the final adapters.

Reads top to bottom: `run_recipe` -> `Trainer.run_unit` -> `Trainer.step`.
"""
from __future__ import annotations

import shutil
import signal
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from data_tools.analysis import token_overflow

from . import atomic
from .batches import BatchOrder, derive_seed, local_slice
from .cascade import Cascade, default_cache_dir
from .checkpoint import list_checkpoints, load_latest, optimizer_from_tensors, optimizer_to_tensors, save_checkpoint, unit_name
from .contrastive import DEFAULT_SWAPS, ContrastiveTerm, all_hard_negatives, contrastive_weight
from .determinism import deterministic_kernels
from .distill import DistillObjective, Distiller, build_student, probe_inputs
from .ema import EMA
from .errors import UserError
from .faults import crash_point
from .guards import StopRequest, Stopped, resource_errors, run_lock
from .loggers import MetricSinks
from .methods import FullMethod, make_method
from .objective import StageObjective, low_resolution, stage_objective
from .phase_data import PhaseData, load_phase_data
from .rundir import STUDENTS, RunDir
from .schedule import set_lr, step_decay_lr
from .text_cache import MAX_LENGTH, TextEmbeddingCache, tokenizer_settings


@dataclass
class RunSummary:
    run_dir: Path
    adapters: dict[str, Path] = field(default_factory=dict)
    students: dict[str, Path] = field(default_factory=dict)
    seconds: float = 0.0
    report: Path | None = None
    evaluation: dict | None = None


def _accelerator(recipe):
    from accelerate import Accelerator

    return Accelerator(cpu=recipe.train.device == "cpu", mixed_precision=recipe.train.mixed_precision)


class Trainer:
    def __init__(self, loaded, run: RunDir, accelerator, cascade: Cascade, cache_dir: Path):
        self.loaded = loaded
        self.recipe = loaded.recipe
        self.run = run
        self.acc = accelerator
        self.cascade = cascade
        self.cache_dir = cache_dir
        self.main = accelerator.is_main_process
        self.phase_data: dict[str, PhaseData] = {}
        self.text_cache: TextEmbeddingCache | None = None
        self.method = make_method(self.recipe, self.acc.device.type)
        self.stop: StopRequest | None = None
        self.contrast: ContrastiveTerm | None = None
        self.distiller: Distiller | None = None
        self.sinks = MetricSinks(self.recipe.logging, run.path, {}, enabled=False)

    def say(self, message: str) -> None:
        if self.main:
            tqdm.write(message)

    def progress(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.main, leave=False)

    # ------------------------------------------------------------------ setup
    def prepare_data(self) -> None:
        recipe = self.recipe
        sizes = [self.cascade.resolution(s) for s in recipe.cascade.stages]
        report = {}
        for i, phase in enumerate(recipe.phases):
            data = load_phase_data(phase.data, sizes, self.cache_dir, f"phases.{i}.data",
                                   self.progress)
            self.phase_data[phase.name] = data
            report[phase.name] = data.report()
            self.say(f"phase {phase.name}: {len(data.captions)} samples"
                     + (f", {len(data.rejected)} skipped (see data_report.json)" if data.rejected else ""))
        tokenizer = self.cascade.load_tokenizer()
        for name, data in self.phase_data.items():
            long = token_overflow(data.captions, tokenizer, MAX_LENGTH)
            for i, (tokens, lost) in long.items():
                report[name]["warnings"].append({"where": data.wheres[i], "warning": (
                    f"caption has {tokens} tokens, the text encoder reads {MAX_LENGTH}: {lost} lost")})
            if long:
                self.say(f"phase {name}: {len(long)} caption(s) longer than {MAX_LENGTH} tokens are"
                         " truncated (see data_report.json)")
        raw = dict(self.phase_data)  # replay and distillation draw on each phase's own data
        for i, phase in enumerate(recipe.phases):
            if phase.replay is not None:
                sources = recipe.replay_sources(i)
                self.phase_data[phase.name], count = raw[phase.name].with_replay(
                    [raw[name] for name in sources], phase.replay.fraction,
                    derive_seed(recipe.seed, phase.name, "replay"))
                report[phase.name]["replay"] = {"phases": sources, "fraction": phase.replay.fraction,
                                                "samples": count}
                self.say(f"phase {phase.name}: + {count} replayed samples of {', '.join(sources)}")
        if recipe.distill is not None:  # the student learns on the named phases' data
            self.phase_data[recipe.distill_phase().name] = PhaseData.concat(
                [raw[name] for name in recipe.distill.data_phases(recipe.phases)])
        if self.main:
            atomic.write_json(self.run / "data_report.json", report)
        self.text_cache = TextEmbeddingCache(self.cache_dir, self.cascade.text_encoder_identity(),
                                             tokenizer_settings(tokenizer))
        captions = sorted({c for d in self.phase_data.values() for c in d.captions}
                          | {c for d in self.phase_data.values() if d.validation for c in d.validation.captions}
                          | set(self.recipe.train.sample_prompts))
        spec = self.recipe.losses.contrastive
        if spec.kind == "denoising" and spec.hard_negatives:
            captions = sorted(set(captions) | all_hard_negatives(captions, spec.swap_words or DEFAULT_SWAPS))
        if self.main:
            todo = len(self.text_cache.missing(captions))
            bar = self.progress(todo, "encode captions")
            self.text_cache.ensure(captions, lambda: (tokenizer, self.cascade.load_text_encoder()),
                                   device=self.acc.device, progress=bar)
            bar.close()
            self.say(f"text embeddings: {todo} encoded, {len(captions) + 1 - todo} from cache")
        self.acc.wait_for_everyone()
        self.text_cache.reload()  # other processes re-read the shards the main one wrote

    def objective(self, stage: str, phase=None) -> StageObjective:
        vlb_weight = None
        if phase is not None and phase.loss.vlb_weight is not None:
            vlb_weight = phase.loss.vlb_weight
        return stage_objective(self.cascade, stage, self.recipe.train, vlb_weight)

    # ------------------------------------------------------------------ one unit
    def phase_at(self, phase_index: int):
        """The recipe's phases, then the distill block as one more phase."""
        phases = self.recipe.phases
        return phases[phase_index] if phase_index < len(phases) else self.recipe.distill_phase()

    def is_distill(self, phase_index: int) -> bool:
        return phase_index >= len(self.recipe.phases)

    def unit_method(self, phase_index: int):
        """A student trains every weight whatever the recipe's method."""
        return FullMethod() if self.is_distill(phase_index) else self.method

    def schedule_offset(self, phase_index: int, stage: str) -> int:
        """Optimizer steps of this stage before this phase on the shared LR schedule."""
        if (self.is_distill(phase_index) or self.recipe.optim.lr.restart_each_phase
                or self.recipe.phases[phase_index].lr):
            return 0
        return sum(p.steps_for(stage) for p in self.recipe.phases[:phase_index]
                   if p.lr is None)

    def build_unet(self, stage: str, init_from: Path | None, phase=None):
        """The stage's UNet ready to train: the method applied, started from the previous
        phase's result when there is one."""
        recipe = self.recipe
        unet = self.cascade.load_unet(stage)
        torch.manual_seed(derive_seed(recipe.seed, "lora-init", stage))
        method = self.method
        if phase is not None and phase.lora_dropout is not None and method.name == "lora":
            method = make_method(recipe.model_copy(update={"lora": recipe.lora.model_copy(
                update={"dropout": phase.lora_dropout})}), self.acc.device.type)
        method.prepare(unet, stage)
        if init_from is not None:
            self.method.load_exported(unet, init_from)
        self.apply_memory_settings(unet)
        return unet

    def apply_memory_settings(self, unet, trains: bool = True) -> None:
        """The recipe's gradient checkpointing (for a UNet that trains) and attention kernels."""
        if trains and self.recipe.train.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        if self.recipe.train.attention == "xformers":
            unet.enable_xformers_memory_efficient_attention()

    def build_student(self, stage: str, teacher_from: Path, objective):
        """The student UNet and the distiller (teacher fused and frozen, hooks, projections)."""
        recipe = self.recipe
        teacher = self.cascade.load_unet(stage)
        if self.method.name == "lora":
            self.method.prepare(teacher, stage)
            self.method.load_exported(teacher, teacher_from)
            teacher.fuse_lora()  # merged into the weights: no LoRA cost per teacher forward
            teacher.unload_lora()
        else:
            self.method.load_exported(teacher, teacher_from)
        spec = recipe.distill
        student, start = build_student(teacher, spec.student,
                                       derive_seed(recipe.seed, "student-init", stage))
        self.say(f"distill stage {stage}: student {sum(p.numel() for p in student.parameters()):,} "
                 f"parameters (teacher {sum(p.numel() for p in teacher.parameters()):,}); "
                 f"of {start['total']} tensors, {start['copied']} copied from the teacher, "
                 f"{start['narrowed']} narrowed from it, {start['random']} random")
        torch.manual_seed(derive_seed(recipe.seed, "student-projections", stage))
        probe = probe_inputs(student, objective, self.cascade.text_dim(), MAX_LENGTH, "cpu")
        distiller = Distiller(teacher, student, spec.weights, probe,
                              aligned=spec.student.init == "teacher_narrowed").to(self.acc.device)
        self.apply_memory_settings(student)
        self.apply_memory_settings(teacher, trains=False)
        return student, distiller

    def run_unit(self, phase_index: int, stage: str, init_from: Path | None) -> Path:
        recipe, phase = self.recipe, self.phase_at(phase_index)
        method = self.unit_method(phase_index)
        unit = unit_name(phase.name, stage)
        out_dir = self.run / "phases" / phase.name / f"stage_{stage}"
        data = self.phase_data[phase.name]
        pixels = data.pixels[self.cascade.resolution(stage)]
        batch = phase.batch_for(stage, recipe.optim.batch_size)
        steps = phase.steps_for(stage)
        world = self.acc.num_processes
        if batch % (world * recipe.optim.grad_accum):
            where = "distill" if self.is_distill(phase_index) else f"phases.{phase_index}"
            raise UserError(f"{where}: batch size {batch} must be divisible by "
                            f"processes x grad_accum ({world} x {recipe.optim.grad_accum})")
        lr_spec = phase.lr or recipe.optim.lr
        objective = self.objective(stage, phase)
        self.distiller = None
        if self.is_distill(phase_index):
            unet, self.distiller = self.build_student(stage, init_from, objective)
            objective = DistillObjective(objective, self.distiller)
        else:
            unet = self.build_unet(stage, init_from, phase)
        params = method.trainable(unet)
        ema = EMA(params, recipe.train.ema.decay) if recipe.train.ema.decay > 0 else None
        self.contrast = None
        if recipe.losses.contrastive.kind != "off" and self.distiller is None:
            self.contrast = ContrastiveTerm(recipe.losses.contrastive, unet, self.cascade.text_dim(),
                                            derive_seed(recipe.seed, unit, "contrastive-heads")).to(self.acc.device)
        for extra in self.extras():
            params = params + extra.parameters()
        optimizer = make_optimizer(recipe.optim, params, lr_spec.start)
        start = 0
        ckpt = load_latest(self.run / "checkpoints", unit, warn=self.say)
        if ckpt is not None:
            method.load_state(unet, ckpt.tensors)
            for extra in self.extras():
                extra.load(ckpt.tensors)
            if ema is not None:
                ema.load(ckpt.tensors)
            optimizer_from_tensors(optimizer, ckpt.tensors, ckpt.meta["optimizer"])
            start = ckpt.step
            self.say(f"{unit}: resuming from {ckpt.path.name}")
        if self.main:
            self.run.truncate_metrics(unit, start)
        unet.train()
        model, optimizer = self.acc.prepare(unet, optimizer)
        if recipe.train.compile:  # self.plain(model) gives the UNet back for state and export
            model = torch.compile(model)
        order = BatchOrder(len(data.captions), batch, recipe.seed, unit)
        offset = self.schedule_offset(phase_index, stage)
        bar = tqdm(range(start, steps), initial=start, total=steps,
                   desc=f"{phase.name} stage {stage}", disable=not self.main)
        skipped = 0
        caption_dropout = phase.loss.caption_dropout
        for step in bar:
            lr = step_decay_lr(offset + step, lr_spec.start, lr_spec.end, lr_spec.decay_every,
                               lr_spec.decay_factor, lr_spec.warmup_steps)
            set_lr(optimizer, lr)
            with resource_errors(f"{unit} step {step + 1}"):
                metrics = self.step(model, optimizer, objective, order, pixels, data.captions, step,
                                    phase.data.flip, caption_dropout)
            crash_point("step")
            if metrics["skipped"]:
                skipped += 1
                self.on_nonfinite(unit, step + 1, skipped)
            elif ema is not None:
                ema.update()
            metrics["skipped_total"] = skipped
            metrics.update(unit=unit, phase=phase.name, stage=stage, step=step + 1, lr=lr)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{lr:.1e}")
            last = step + 1 == steps
            every = recipe.train.validate_every
            if data.validation is not None and (last or (every and (step + 1) % every == 0)):
                metrics["val_loss"] = self.validation_loss(model, objective, data.validation, stage, unit)
            every = recipe.train.sample_every
            if every and ((step + 1) % every == 0 or last) and self.main:
                self.progress_samples(model, stage, data, unit, step + 1)
            if self.main and ((step + 1) % recipe.train.log_every == 0 or last or "val_loss" in metrics):
                self.run.log_metrics(metrics)
                self.sinks.log(metrics, self.unit_offset(phase_index, stage) + step + 1)
            written = (step + 1) % recipe.train.checkpoint_every == 0 or step + 1 == steps
            if written:
                self.checkpoint(model, optimizer, unit, step + 1, ema, method)
            if self.stop_requested():
                if not written:
                    self.checkpoint(model, optimizer, unit, step + 1, ema, method)
                bar.close()
                raise Stopped(self.stop.signal, f"{unit} step {step + 1} of {steps}")
        bar.close()
        for extra in self.extras():
            extra.close()
        if self.main:
            provenance = dict(self.provenance(phase.name, stage, data), skipped_steps=skipped)
            if self.distiller is not None:
                provenance.update(method="distill", student=recipe.distill.student.model_dump(),
                                  distill_weights=recipe.distill.weights.model_dump(),
                                  teacher=str(init_from), feature_pairs=self.distiller.pairs)
            with resource_errors(f"the result of {unit} in {out_dir}",
                                 "the checkpoints are intact"):
                self.export(self.plain(model), out_dir, provenance, ema, method)
            self.run.mark_completed(unit)
        self.acc.wait_for_everyone()
        self.acc.free_memory()
        return out_dir

    def step(self, model, optimizer, objective, order: BatchOrder, pixels, captions, step,
             use_flip: bool = False, caption_dropout: float | None = None):
        """One optimizer step over the global batch (this process's share, in micro-batches)."""
        from data_tools.prepare import to_model_range

        recipe = self.recipe
        gen = order.generator(step)
        torch.manual_seed(derive_seed(recipe.seed, order.unit, "dropout", step))
        idx = order.indices(step)
        size = pixels.shape[-1]
        draws = objective.draw((len(idx), 3, size, size), gen)
        if caption_dropout is None:
            caption_dropout = recipe.train.caption_dropout
        drop = torch.rand(len(idx), generator=gen) < caption_dropout
        flip = torch.rand(len(idx), generator=gen) < 0.5
        mine = local_slice(len(idx), self.acc.process_index, self.acc.num_processes)
        accum = recipe.optim.grad_accum
        local = range(mine.start, mine.stop)
        micro = len(local) // accum
        totals: dict[str, float] = {}
        for m in range(accum):
            part = list(local[m * micro:(m + 1) * micro])
            images = to_model_range(pixels[idx[part]]).to(self.acc.device)
            if use_flip:
                images = torch.where(flip[part].view(-1, 1, 1, 1).to(images.device),
                                     images.flip(-1), images)
            texts = ["" if drop[i] else captions[idx[i]] for i in part]
            embeds = self.text_cache.get(texts).to(self.acc.device)
            sub = {k: v[part] for k, v in draws.items()}
            sync = m == accum - 1
            context = self.acc.no_sync(model) if not sync and self.acc.num_processes > 1 else _null()
            with context, self.acc.autocast():
                loss, metrics = objective.loss(model, images, embeds, sub)
                loss = loss.mean()
                weight = contrastive_weight(recipe.losses.contrastive, step) if self.contrast else 0.0
                if weight > 0:
                    cgen = torch.Generator().manual_seed(derive_seed(recipe.seed, order.unit, "contrastive", step, m))
                    term = self.contrast.loss(model, objective, images, embeds, texts, sub, self.text_cache, cgen)
                    metrics["loss_contrastive"] = term.detach()
                    loss = loss + weight * term
                loss = loss / accum
                self.acc.backward(loss)
            totals["loss"] = totals.get("loss", 0.0) + loss.item()
            for k, v in metrics.items():
                totals[k] = totals.get(k, 0.0) + v.item() / accum
        trainable = [p for p in model.parameters() if p.requires_grad]
        heads = [p for extra in self.extras() for p in extra.parameters()]
        if heads:
            if self.acc.num_processes > 1:  # the heads are outside DDP: average their gradients
                for p in heads:
                    if p.grad is not None:
                        p.grad = self.acc.reduce(p.grad, reduction="mean")
            trainable = trainable + heads
        finite = self.all_finite(totals["loss"], trainable)
        grad_norm = None
        if finite and recipe.optim.max_grad_norm > 0:
            grad_norm = self.acc.clip_grad_norm_(trainable, recipe.optim.max_grad_norm)
        if finite:
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        totals["skipped"] = 0.0 if finite else 1.0
        if self.acc.num_processes > 1:
            # Log the global batch's loss, not the main process's share.
            names = sorted(totals)
            stacked = self.acc.reduce(torch.tensor([totals[n] for n in names], device=self.acc.device),
                                      reduction="mean")
            totals = dict(zip(names, stacked.tolist()))
        if grad_norm is not None:
            totals["grad_norm"] = float(grad_norm)
        return totals

    def unit_offset(self, phase_index: int, stage: str) -> int:
        """Optimizer steps of all units before this one: the x axis of wandb/TensorBoard."""
        recipe, total = self.recipe, 0
        for i, phase in enumerate(recipe.phases):
            for s in recipe.cascade.stages:
                if (i, s) == (phase_index, stage):
                    return total
                total += phase.steps_for(s)
        return total

    def stop_requested(self) -> bool:
        if self.stop is None:
            return False
        flag = torch.tensor(float(self.stop.requested), device=self.acc.device)
        if self.acc.num_processes > 1:  # stop together even if one process got the signal
            flag = self.acc.reduce(flag, reduction="sum")
        if flag.item() > 0 and self.stop.signal is None:
            self.stop.signal = signal.SIGTERM
        return flag.item() > 0

    def on_nonfinite(self, unit: str, step: int, skipped: int) -> None:
        train = self.recipe.train
        last = list_checkpoints(self.run / "checkpoints", unit)
        good = last[-1].name if last else "none yet (the unit restarts from its beginning)"
        where = f"non-finite loss or gradient in {unit} at step {step}"
        if train.on_nonfinite == "stop" or skipped > train.max_skipped_steps:
            why = ("train.on_nonfinite is stop" if train.on_nonfinite == "stop" else
                   f"{skipped} steps skipped, above train.max_skipped_steps={train.max_skipped_steps}")
            raise UserError(f"{where} ({why}); last good checkpoint: {good}; lower optim.lr.start, "
                            "use bf16 instead of fp16, or check the data, then --resume")
        self.say(f"{where}: step skipped ({skipped} so far)")

    def plain(self, model):
        """The UNet itself: without the DDP wrapper and without torch.compile's wrapper (whose
        state_dict keys carry an `_orig_mod.` prefix)."""
        return self.acc.unwrap_model(model, keep_torch_compile=False)

    def extras(self) -> list:
        """Training-only modules of the unit (contrastive heads, distillation projections):
        optimised and checkpointed with the UNet, never exported."""
        return [x for x in (self.contrast, self.distiller) if x is not None]

    def export(self, unet, out_dir: Path, provenance: dict, ema: EMA | None, method=None) -> None:
        """The unit's result; with EMA, the weights not chosen by train.ema.export go beside
        it (ema/ or raw/), both loadable the same way."""
        method = method or self.method
        if ema is None:
            method.export(unet, out_dir, provenance)
            return
        use_ema = self.recipe.train.ema.export == "ema"
        beside = out_dir / ("raw" if use_ema else "ema")
        method.export(unet, beside if use_ema else out_dir, dict(provenance, weights="raw"))
        with ema.swapped():
            method.export(unet, out_dir if use_ema else beside,
                          dict(provenance, weights="ema", ema_decay=ema.decay))

    @torch.no_grad()
    def validation_loss(self, model, objective, held: PhaseData, stage: str, unit: str) -> float:
        """Mean denoising loss on the held-out split with fixed noise and timesteps (the same
        draws at every evaluation, so the curve moves only with the weights); no caption
        dropout. Each process takes its share; the mean is reduced across processes."""
        from data_tools.prepare import to_model_range

        pixels = held.pixels[self.cascade.resolution(stage)]
        gen = torch.Generator().manual_seed(derive_seed(self.recipe.seed, "validation", unit))
        draws = objective.draw(tuple(pixels.shape), gen)
        mine = local_slice(len(pixels), self.acc.process_index, self.acc.num_processes)
        was_training = model.training
        model.eval()
        total = torch.zeros(2, device=self.acc.device)
        batch = self.recipe.optim.batch_size
        for start in range(mine.start, mine.stop, batch):
            part = list(range(start, min(start + batch, mine.stop)))
            images = to_model_range(pixels[part]).to(self.acc.device)
            embeds = self.text_cache.get([held.captions[i] for i in part]).to(self.acc.device)
            with self.acc.autocast():
                loss, _ = objective.loss(model, images, embeds, {k: v[part] for k, v in draws.items()})
            total += torch.stack([loss.float().sum(), torch.tensor(float(len(part)), device=self.acc.device)])
        if self.acc.num_processes > 1:
            total = self.acc.reduce(total, reduction="sum")
        model.train(was_training)
        return float(total[0] / total[1].clamp(min=1))

    @torch.no_grad()
    def progress_samples(self, model, stage: str, data: PhaseData, unit: str, step: int) -> None:
        """A grid of what the stage makes now: stage I from the sample prompts, a
        super-resolution stage from down-sampled training images. Text embeddings come from
        the cache (the text encoder is not loaded)."""
        from diffusers import IFPipeline, IFSuperResolutionPipeline

        from .evaluate import save_png
        from .sampling import _generators, image_grid

        prompts = self.sample_prompts(data)
        embeds = self.text_cache.get(prompts).to(self.acc.device)
        negative = self.text_cache.get([""] * len(prompts)).to(self.acc.device)
        unet = self.plain(model)
        was_training = unet.training
        unet.eval()
        common = dict(tokenizer=None, text_encoder=None, unet=unet, scheduler=self.cascade.load_scheduler(stage),
                      safety_checker=None, feature_extractor=None, watermarker=None,
                      requires_safety_checker=False)
        sample = self.recipe.eval.sample
        generators = _generators(sample.seed, 0, len(prompts))
        if self.cascade.is_super_resolution(stage):
            from data_tools.prepare import to_model_range

            pipe = IFSuperResolutionPipeline(image_noising_scheduler=self.cascade.load_image_noising_scheduler(stage), **common)
            size = self.cascade.resolution(stage)
            low_size = low_resolution(self.cascade, stage, self.recipe.train)
            originals = to_model_range(data.pixels[size][:len(prompts)]).to(self.acc.device)
            low = torch.nn.functional.interpolate(originals, size=low_size, mode="bilinear", antialias=True)
            settings = dict(image=low, num_inference_steps=sample.steps_II, guidance_scale=sample.guidance_scale_II,
                            noise_level=sample.noise_level)
        else:
            pipe = IFPipeline(**common)
            settings = dict(num_inference_steps=sample.steps, guidance_scale=sample.guidance_scale)
        pipe.set_progress_bar_config(disable=True)
        with self.acc.autocast():  # a half-precision frozen base samples as it trains
            out = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generators,
                       output_type="pil", **settings).images
        unet.train(was_training)
        save_png(image_grid(out), self.run / "samples" / "progress" / f"{unit}-step_{step:06d}.png")

    def sample_prompts(self, data: PhaseData) -> list[str]:
        return list(self.recipe.train.sample_prompts) or data.captions[:4]

    def all_finite(self, loss: float, params) -> bool:
        """Loss and every gradient finite, agreed by all processes (they must skip together)."""
        ok = torch.tensor(float(torch.isfinite(torch.tensor(loss)).item()), device=self.acc.device)
        for param in params:
            if param.grad is not None and not torch.isfinite(param.grad).all():
                ok.zero_()
                break
        if self.acc.num_processes > 1:
            ok = self.acc.reduce(ok, reduction="mean")
        return bool(ok.item() == 1.0)

    def checkpoint(self, model, optimizer, unit: str, step: int, ema: EMA | None = None,
                   method=None) -> None:
        if self.main:
            tensors = (method or self.method).state(self.plain(model))
            if ema is not None:
                tensors.update(ema.state())
            for extra in self.extras():
                tensors.update(extra.state())
            opt_tensors, opt_meta = optimizer_to_tensors(optimizer)
            tensors.update(opt_tensors)
            with resource_errors(f"the checkpoint of {unit} at step {step}",
                                 "earlier checkpoints are intact"):
                save_checkpoint(self.run / "checkpoints", unit, step, tensors,
                                {"optimizer": opt_meta, "recipe_hash": self.loaded.hash},
                                self.recipe.train.keep_checkpoints)
        self.acc.wait_for_everyone()

    def provenance(self, phase: str, stage: str, data: PhaseData) -> dict:
        from .rundir import library_versions

        recipe = self.recipe
        return {"stage": stage, "phase": phase, "method": recipe.method, "rank": recipe.lora.rank_for(stage), "alpha": recipe.lora.alpha_for(stage),
                "target_modules": recipe.lora.target_modules, "recipe": recipe.name,
                "recipe_hash": self.loaded.hash, "base_cascade": recipe.cascade.model_dump(),
                "data": data.source, "data_fingerprint": data.fingerprint,
                "data_samples": len(data.captions),
                "kit_version": library_versions().get("cascade-adaptation-kit")}


def make_optimizer(spec, params, lr: float):
    """AdamW, or bitsandbytes' 8-bit AdamW (same hyper-parameters, 8-bit state)."""
    kwargs = dict(lr=lr, betas=spec.betas, eps=spec.eps, weight_decay=spec.weight_decay)
    if spec.name == "adamw8bit":
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise UserError("optim.name: adamw8bit needs bitsandbytes: pip install -e '.[bitsandbytes]'") from None
        return bnb.optim.AdamW8bit(params, **kwargs)
    return torch.optim.AdamW(params, **kwargs)


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def evaluate_run(trainer: Trainer, summary: RunSummary) -> None:
    """Sample and judge the recipe's prompt sets with the base cascade (before) and the
    trained one (after); grids under samples/, numbers in eval.json."""
    from .evaluate import evaluate_run_dir, trained_variants

    spec = trainer.recipe.eval
    if not spec.prompt_sets or not trainer.main:
        return
    summary.evaluation = evaluate_run_dir(
        trainer.run.path, trainer.cascade, spec, spec.prompt_sets,
        trained_variants(trainer.run.path, trainer.method.name), trainer.progress, trainer.say,
        trainer.recipe.train)


def evaluate_finished_run(loaded, run: Path, prompt_sets: dict[str, str]) -> dict:
    """`finetune eval RUN`: the same evaluation on a finished run, then its report again."""
    from .evaluate import evaluate_run_dir, trained_variants
    from .report import write_report

    recipe = loaded.recipe
    cache_dir = Path(recipe.cache_dir).expanduser() if recipe.cache_dir else default_cache_dir()
    cascade = Cascade.from_spec(recipe.cascade.path, recipe.cascade.stage_paths,
                                recipe.cascade.revision, cache_dir)
    results = evaluate_run_dir(run, cascade, recipe.eval, prompt_sets,
                               trained_variants(run, recipe.method),
                               lambda n, d: tqdm(total=n, desc=d, leave=False), tqdm.write, recipe.train)
    write_report(run)
    return results


def run_recipe(loaded, resume: bool = False, overwrite: bool = False) -> RunSummary:
    recipe = loaded.recipe
    started = time.time()
    acc = _accelerator(recipe)
    run = RunDir(recipe.output_dir)
    with ExitStack() as guards:
        if acc.is_main_process:
            guards.enter_context(run_lock(run.path))
            run.prepare(loaded, resume=resume, overwrite=overwrite)
        stop = guards.enter_context(StopRequest())
        guards.enter_context(deterministic_kernels(recipe.train.deterministic))
        return _run(loaded, acc, run, stop, started)


def _run(loaded, acc, run: RunDir, stop: StopRequest, started: float) -> RunSummary:
    recipe = loaded.recipe
    acc.wait_for_everyone()
    cache_dir = Path(recipe.cache_dir).expanduser() if recipe.cache_dir else default_cache_dir()
    cascade = Cascade.from_spec(recipe.cascade.path, recipe.cascade.stage_paths,
                                recipe.cascade.revision, cache_dir)
    trainer = Trainer(loaded, run, acc, cascade, cache_dir)
    trainer.stop = stop
    trainer.sinks = MetricSinks(recipe.logging, run.path, loaded.resolved, enabled=acc.is_main_process)
    try:
        return _train_and_finish(trainer, acc, run, cascade, started)
    finally:
        trainer.sinks.close()


def distill_students(trainer: Trainer, run: RunDir, done) -> dict[str, Path]:
    """The distill block: one unit per stage, teacher = the stage's published result;
    each student is written to run/students/stage_X as a save_pretrained UNet folder."""
    from .atomic import atomic_dir

    recipe = trainer.recipe
    students: dict[str, Path] = {}
    if recipe.distill is None:
        return students
    index = len(recipe.phases)
    phase = recipe.distill_phase()
    method = trainer.unit_method(index)
    for stage in recipe.distill_stages():
        unit = unit_name(phase.name, stage)
        out_dir = run / "phases" / phase.name / f"stage_{stage}"
        teacher = run / trainer.method.output_folder / f"stage_{stage}"
        if unit in done and method.exported(out_dir):
            trainer.say(f"{unit}: finished earlier, not re-run")
        else:
            out_dir = trainer.run_unit(index, stage, teacher)
        students[stage] = run / STUDENTS / f"stage_{stage}"
        if trainer.main:
            with atomic_dir(students[stage]) as tmp:
                shutil.copytree(out_dir / "unet", tmp, dirs_exist_ok=True)
        trainer.acc.wait_for_everyone()
    return students


def _train_and_finish(trainer: Trainer, acc, run: RunDir, cascade: Cascade, started: float) -> RunSummary:
    recipe = trainer.recipe
    trainer.prepare_data()
    done = run.completed_units()
    latest: dict[str, Path] = {}
    for phase_index, phase in enumerate(recipe.phases):
        for stage in recipe.cascade.stages:
            unit = unit_name(phase.name, stage)
            out_dir = run / "phases" / phase.name / f"stage_{stage}"
            if unit in done and trainer.method.exported(out_dir):
                trainer.say(f"{unit}: finished earlier, not re-run")
            else:
                out_dir = trainer.run_unit(phase_index, stage, latest.get(stage))
            latest[stage] = out_dir
        crash_point("between-phases")
    summary = RunSummary(run.path)
    if acc.is_main_process:
        for stage, src in latest.items():
            target = run / trainer.method.output_folder / f"stage_{stage}"
            trainer.method.publish(src, target, cascade.stage_dirs[stage])
            summary.adapters[stage] = target
    acc.wait_for_everyone()
    summary.students = distill_students(trainer, run, done)
    if acc.is_main_process:
        evaluate_run(trainer, summary)
        from .report import write_report

        summary.report = write_report(run.path)
        summary.seconds = time.time() - started
        atomic.write_json(run / "finished.json", {"seconds": round(summary.seconds, 1),
                                                  "adapters": {k: str(v) for k, v in summary.adapters.items()}})
    acc.wait_for_everyone()
    return summary
