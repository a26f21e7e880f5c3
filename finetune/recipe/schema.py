"""The recipe schema: every key a recipe may hold, its type, range and default.

Unknown keys are errors (a typo must never silently change training). Cross-field rules
live in `Recipe.check` so they are reported together with the field errors.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

StageName = Literal["I", "II", "III"]
IF_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "add_k_proj", "add_v_proj"]


def _per_stage(kind: str, example: str, convert):
    """A validator for one value for every stage, or {stage: value}; one clear error either way.
    `convert` returns the value or None when it is not a valid `kind`."""
    def validate(value):
        def one(v):
            converted = None if isinstance(v, bool) else convert(v)
            if converted is None:
                raise ValueError(f"expected {kind}, or one per stage like {example} (got {v!r})")
            return converted

        if isinstance(value, dict):
            for stage in value:
                if stage not in ("I", "II", "III"):
                    raise ValueError(f"unknown stage {stage!r} (I, II or III)")
            return {stage: one(v) for stage, v in value.items()}
        return one(value)
    return BeforeValidator(validate)


def _whole_at_least_1(v):
    return v if isinstance(v, int) and v >= 1 else None


def _number_above_0(v):
    return float(v) if isinstance(v, (int, float)) and v > 0 else None


PerStageCount = Annotated[Any, _per_stage("a whole number of at least 1", "{I: 3000, II: 1000}", _whole_at_least_1)]
PerStageRank = Annotated[Any, _per_stage("a whole number of at least 1", "{I: 8, II: 4}", _whole_at_least_1)]
PerStageNumber = Annotated[Any, _per_stage("a number above 0", "{I: 16, II: 8}", _number_above_0)]


def value_for_stage(value, stage: str):
    """The value for `stage` of a one-for-all or {stage: value} field (None when not listed)."""
    return value.get(stage) if isinstance(value, dict) else value


def per_stage_problems(loc: tuple, value, stages: list[str], if_missing: str | None = None) -> list[tuple[tuple, str]]:
    """(key path, message) for each stage a {stage: value} field names outside `stages`, and,
    given `if_missing` (a message with {missing}), for the stages of `stages` it leaves out."""
    if not isinstance(value, dict):
        return []
    missing = [stage for stage in stages if stage not in value]
    problems = [(loc, if_missing.format(missing=", ".join(missing)))] if if_missing and missing else []
    return problems + [(loc + (stage,), f"stage {stage} is not in cascade.stages ({', '.join(stages)})")
                       for stage in value if stage not in stages]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class CascadeSpec(Strict):
    path: str | None = Field("builtin:tiny-random", description=(
        "A folder in the IF layout (stage_I/, stage_II/), a single IFPipeline folder, or "
        "builtin:tiny-random. Example: path: ./my-cascade"))
    stage_paths: dict[StageName, str] = Field(default_factory=dict, description=(
        "Per-stage folder or cached hub id; overrides path. Example: {I: DeepFloyd/IF-I-XL-v1.0}"))
    revision: str | None = Field(None, description="Hub revision for hub ids.")
    stages: list[StageName] = Field(default_factory=lambda: ["I"], min_length=1,
                                    description="Stages to adapt, in cascade order.")


class LoraSpec(Strict):
    rank: PerStageRank = Field(8, description=(
        "LoRA rank r; higher = more capacity, more memory. One number, or per stage {I: 8, II: 4}."))
    alpha: PerStageNumber = Field(8.0, description=(
        "LoRA alpha; the update is scaled by alpha / rank. One number, or per stage {I: 16, II: 8}."))
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] = Field(default_factory=lambda: list(IF_LORA_TARGETS), min_length=1,
                                      description="Module name suffixes to adapt (IF attention by default).")
    min_frozen_fraction: float = Field(0.9, gt=0.0, le=1.0, description=(
        "Refuse to run if less than this fraction of the stage's parameters is frozen."))

    def rank_for(self, stage: str) -> int:
        return value_for_stage(self.rank, stage)

    def alpha_for(self, stage: str) -> float:
        return value_for_stage(self.alpha, stage)

    def describe(self, stages: list[str]) -> str:
        """'rank 5, alpha 10' or 'stage I rank 8, alpha 16; stage II rank 5, alpha 10'."""
        def one(stage):
            return f"rank {self.rank_for(stage)}, alpha {self.alpha_for(stage):g}"
        if not isinstance(self.rank, dict) and not isinstance(self.alpha, dict):
            return one(stages[0])
        return "; ".join(f"stage {s} {one(s)}" for s in stages)


class LRSpec(Strict):
    start: float = Field(1.0e-4, gt=0, description="Learning rate at step 0 (after warm-up).")
    end: float = Field(1.0e-5, gt=0, description="Floor of the step decay.")
    decay_every: int = Field(50_000, ge=1, description="Optimizer steps between decays.")
    decay_factor: float = Field(10.0, gt=1.0, description="Divide the rate by this at each decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    restart_each_phase: bool = Field(False, description=(
        "Restart the schedule at each phase (default: one schedule across all phases)."))


class OptimSpec(Strict):
    name: Literal["adamw", "adamw8bit"] = Field("adamw", description=(
        "adamw8bit keeps optimizer state in 8 bits (bitsandbytes; CUDA, or CPU from 0.50): less memory for large LoRA or full training."))
    batch_size: int = Field(16, ge=1, description="Global batch per optimizer step, across processes and accumulation.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step; lowers memory at equal batch.")
    lr: LRSpec = Field(default_factory=LRSpec)
    weight_decay: float = Field(1e-2, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = Field(1e-8, gt=0)
    max_grad_norm: float = Field(1.0, ge=0, description="Gradient clipping; 0 disables.")


class DataSpec(Strict):
    path: str = Field(..., description="Dataset folder. Example: path: data/domain")
    format: Literal["auto", "imagefolder", "pairs", "parquet", "save_to_disk"] = Field("auto", description=(
        "auto picks by what the folder holds (save_to_disk files, metadata.jsonl/csv, *.parquet, else pairs)."))
    caption_column: str | None = Field(None, description="Caption column of metadata files (default: text/caption/prompt).")
    image_column: str | None = Field(None, description="Image column: file_name (imagefolder) or image (parquet, save_to_disk) by default.")
    split: str = Field("train", description="Split of a saved DatasetDict.")
    on_bad_sample: Literal["skip", "fail"] = Field("skip", description="skip: report and leave out; fail: stop before training.")
    min_samples: int = Field(1, ge=1, description="Fail before training when fewer usable samples remain.")
    too_small: Literal["upscale", "skip"] = "upscale"
    dedupe: Literal["off", "exact", "near"] = Field("exact", description=(
        "Leave out repeated images: exact copies, or also near-duplicates (perceptual hash)."
        " Near-duplicates are always listed in the data report."))
    validation_fraction: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "Held out for validation loss (train.validate_every); chosen by a hash of each sample's"
        " location, so the split is stable when data is added."))
    flip: bool = Field(False, description="Random horizontal flips (not for data with text or left/right captions).")
    caption_prefix: str = ""
    caption_suffix: str = ""


class PhaseLossSpec(Strict):
    caption_dropout: float | None = Field(None, ge=0.0, le=1.0, description="Overrides train.caption_dropout in this phase.")
    vlb_weight: float | None = Field(None, ge=0.0, description="Overrides train.vlb_weight in this phase.")


class ReplaySpec(Strict):
    fraction: float = Field(..., gt=0.0, lt=1.0, description=(
        "Share of this phase's training samples drawn from earlier phases' data: rehearsal"
        " that holds on to what those phases taught (against forgetting). Example: 0.25"))
    phases: list[str] | None = Field(None, description="Earlier phases to replay (default: every earlier phase).")


class PhaseSpec(Strict):
    name: str = Field(..., min_length=1, description="general, domain, ... (free, order kept)")
    data: DataSpec
    steps: PerStageCount = Field(..., description=(
        "Optimizer steps of each stage in this phase: one number, or per stage {I: 3000, II: 1000}."))
    batch_size: PerStageCount | None = Field(None, description=(
        "Overrides optim.batch_size for this phase: one number, or per stage {I: 32, II: 16}."))
    lr: LRSpec | None = Field(None, description="Overrides optim.lr for this phase (implies a restart).")
    loss: PhaseLossSpec = Field(default_factory=PhaseLossSpec, description="Loss settings of this phase only.")
    lora_dropout: float | None = Field(None, ge=0.0, lt=1.0, description=(
        "Overrides lora.dropout in this phase (rank, alpha and targets stay: the phase continues"
        " the previous phase's adapter)."))
    replay: ReplaySpec | None = Field(None, description=(
        "Mix earlier phases' data into this phase's: {fraction: 0.25} or {fraction: 0.25, phases: [general]}."))

    def steps_for(self, stage: str) -> int:
        return value_for_stage(self.steps, stage) or 0

    def batch_for(self, stage: str, default: int) -> int:
        return value_for_stage(self.batch_size, stage) or default


class StageIISpec(Strict):
    noise_aug_min: int = Field(0, ge=0, le=999, description="Lowest noise-augmentation level of the low-res input.")
    noise_aug_max: int = Field(999, ge=0, le=999, description="Highest level (the stock pipeline samples at 250).")
    low_size: int | None = Field(None, ge=4, description="Low-res size; default: stage I's resolution.")


class EMASpec(Strict):
    decay: float = Field(0.0, ge=0.0, lt=1.0, description=(
        "EMA of the trained weights with this decay (e.g. 0.999); 0 = off."))
    export: Literal["raw", "ema"] = Field("raw", description=(
        "Which weights are the unit's result; the other is saved beside it in an ema/ or"
        " raw/ sub-folder."))


class TrainSpec(Strict):
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description=(
        "bf16 on Ampere+ GPUs halves activation memory. On a CPU with native bf16 (measured on"
        " AVX512-BF16) it trained builtin:tiny's stage II 1.13x faster at 26% less memory, and"
        " stage I 0.85x as fast (docs/performance.md)."))
    caption_dropout: float = Field(0.1, ge=0.0, le=1.0, description="Train with the empty caption this often (classifier-free guidance).")
    variance: Literal["vlb", "ignore"] = Field("vlb", description=(
        "vlb trains IF's learned variance (Improved-DDPM hybrid loss) so the stock scheduler samples correctly."))
    vlb_weight: float = Field(1.0, ge=0.0)
    snr_gamma: float | None = Field(None, gt=0.0, description=(
        "Min-SNR-gamma weighting of the denoising loss (Hang et al. 2023; diffusers' --snr_gamma,"
        " 5.0 is the usual value): caps the weight of low-noise timesteps. Validation losses are"
        " weighted the same way; the logged loss_pred is not. Unset: plain MSE."))
    stage_II: StageIISpec = Field(default_factory=StageIISpec)
    ema: EMASpec = Field(default_factory=EMASpec)
    on_nonfinite: Literal["skip", "stop"] = Field("skip", description=(
        "A NaN/inf loss or gradient: skip that optimizer step (counted in the metrics) or stop"
        " the run naming the step and the last good checkpoint."))
    max_skipped_steps: int = Field(20, ge=0, description=(
        "With on_nonfinite: skip, stop anyway after this many skipped steps in one unit."))
    validate_every: int = Field(0, ge=0, description=(
        "Validation loss on the phase's held-out split (data.validation_fraction) every N steps"
        " and at the end of each unit; 0 = only at the end."))
    sample_every: int = Field(0, ge=0, description="Sample grids of train.sample_prompts every N steps (0 = off).")
    sample_prompts: list[str] = Field(default_factory=list, description=(
        "Prompts for the progress grids (default: the phase's first captions)."))
    checkpoint_every: int = Field(200, ge=1, description="Optimizer steps between checkpoints.")
    keep_checkpoints: int = Field(2, ge=1, description="Checkpoints kept per run (older ones are deleted).")
    attention: Literal["default", "xformers"] = Field("default", description=(
        "xformers: memory-efficient attention kernels (CUDA, pip install -e '.[xformers]')."))
    gradient_checkpointing: bool = Field(False, description="True reduces activation memory at about 30% more compute.")
    log_every: int = Field(10, ge=1)
    num_workers: int = Field(0, ge=0)
    device: Literal["auto", "cpu"] = Field("auto", description="auto: accelerate picks (GPU when present).")
    compile: bool = Field(False, description=(
        "torch.compile the trained UNet: faster steps after a one-off compilation (measured on CPU,"
        " builtin:tiny stage I: 1.26x per step after 183 s; see docs/performance.md)."))
    deterministic: bool = Field(False, description=(
        "Bit-exact reruns and resumes: kernels whose results do not depend on memory layout"
        " (on CPU: oneDNN off; on GPU: deterministic algorithms). Slower; see docs/reliability.md."))


class SampleSpec(Strict):
    steps: int = Field(50, ge=1, description="Stage I denoising steps.")
    steps_II: int = Field(25, ge=1, description="Stage II denoising steps.")
    guidance_scale: float = Field(4.0, ge=0.0, description="Classifier-free guidance of stage I (1 = off).")
    guidance_scale_II: float = Field(4.0, ge=0.0)
    noise_level: int = Field(250, ge=0, le=999, description="Stage II noise augmentation of the stage I image.")
    negative_prompt: str | None = None
    seed: int = Field(0, ge=0)
    batch_size: int = Field(16, ge=1)
    adapter_scale: float = Field(1.0, ge=0.0, description="LoRA scale when sampling (fused).")


class EvalSpec(Strict):
    prompt_sets: dict[str, str] = Field(default_factory=dict, description=(
        "name: prompts to sample and judge; synth:SPLIT?n=48&seed=7, a .jsonl of"
        " {prompt, truth} rows, or a .txt with one prompt per line."))
    before: bool = Field(True, description="Also sample and judge the base cascade (before adaptation).")
    stages: list[StageName] | None = Field(None, description=(
        "Stages to sample through (default: every stage of the cascade); [I] judges stage I's"
        " output alone."))
    grid: int = Field(16, ge=1, description="Images per sample grid.")
    sample: SampleSpec = Field(default_factory=SampleSpec)
    metrics: list[Literal["judge", "fid", "kid", "clip_score", "val_loss"]] = Field(
        default_factory=lambda: ["judge", "fid", "kid", "clip_score", "val_loss"], description=(
            "judge: needs ground truth (synth prompt sets); fid, kid, val_loss: need reference"
            " images (synth prompt sets render theirs; else eval.reference_images); clip_score:"
            " needs eval.clip_model. A metric whose input is missing is left out."))
    feature_extractor: str = Field("offline", description=(
        "FID/KID features: offline (kit-random-conv-v1, no download; comparable only within"
        " this kit) or a path to torch-fidelity's Inception weights .pth. See finetune/metrics.py."))
    clip_model: str | None = Field(None, description="Local CLIP folder (CLIPModel + CLIPProcessor) for clip_score.")
    reference_images: dict[str, str] = Field(default_factory=dict, description=(
        "prompt set name: folder of real image-caption pairs (any data layout) for FID/KID and"
        " the validation loss of that set."))


class WandbSpec(Strict):
    enabled: bool = False
    project: str = "cascade-adaptation"
    entity: str | None = None
    mode: Literal["offline", "online"] = Field("offline", description=(
        "offline writes under the run directory with no account or network (`wandb sync` later)."))


class LoggingSpec(Strict):
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    tensorboard: bool = Field(False, description="Also write TensorBoard event files to RUN/tensorboard.")


def _off_is_not_false(value):
    # YAML 1.1 reads a bare `off` as false; a recipe that says `kind: off` means "off".
    return "off" if value is False else value


class ContrastiveSpec(Strict):
    kind: Annotated[Literal["off", "feature_infonce", "denoising"], BeforeValidator(_off_is_not_false)] = Field("off", description=(
        "feature_infonce: pooled UNet block features vs pooled text, symmetric InfoNCE (no extra"
        " UNet pass); denoising: diffusion-classifier cross-entropy over denoising errors under"
        " the true and negative captions. See finetune/contrastive.py for the maths."))
    weight: float = Field(0.1, ge=0.0, description="Weight of the term next to the diffusion loss.")
    temperature: float = Field(0.1, gt=0.0)
    warmup_steps: int = Field(0, ge=0, description="Ramp the weight linearly from 0 over these steps.")
    block: str = Field("mid", description="feature_infonce: mid, down.N or up.N block output to pool.")
    projection_dim: int = Field(64, ge=1, description="feature_infonce: size of the projection heads.")
    samples: int = Field(4, ge=1, description="denoising: samples per micro-batch that are contrasted.")
    negatives: int = Field(2, ge=1, description="denoising: negative captions per contrasted sample.")
    hard_negatives: bool = Field(True, description=(
        "denoising: negatives are the caption with one attribute word swapped (swap_words)."))
    swap_words: list[list[str]] | None = Field(None, description=(
        "Groups of interchangeable words for hard negatives (default: colours, shapes, counts, positions)."))


class LossesSpec(Strict):
    contrastive: ContrastiveSpec = Field(default_factory=ContrastiveSpec)


class StudentSpec(Strict):
    layers_per_block: int | None = Field(None, ge=1, description=(
        "Resnet (and attention) layers per down block; the up blocks get one more, as in"
        " diffusers. Default: the teacher's."))
    mid_block: bool = Field(True, description="False removes the mid block (BK-SDM's first cut).")
    drop_levels: int = Field(0, ge=0, description=(
        "Remove this many of the lowest-resolution levels (down block, matching up block)."))
    channel_scale: float = Field(1.0, gt=0.0, le=1.0, description=(
        "Scale every level's channels (rounded to what group norm and attention heads allow)."))
    init: Literal["teacher", "teacher_narrowed", "random"] = Field("teacher", description=(
        "teacher: copy every weight whose name maps and shape matches, the rest random;"
        " teacher_narrowed: also keep the teacher's leading channels where the student is"
        " narrower (measured worse on the tiny cascade: docs/distillation.md);"
        " random: the student starts from scratch."))


class DistillWeights(Strict):
    task: float = Field(1.0, ge=0.0, description="The usual denoising loss on the data.")
    output: float = Field(1.0, ge=0.0, description="MSE between student and teacher predictions.")
    feature: float = Field(1.0, ge=0.0, description="MSE between matched block outputs (forward hooks).")


class DistillSpec(Strict):
    stages: list[StageName] | None = Field(None, description="Stages to distil (default: every trained stage).")
    student: StudentSpec = Field(default_factory=StudentSpec)
    data: list[str] | None = Field(None, description=(
        "Names of the phases whose data trains the student (default: every phase's: the student"
        " imitates the teacher on all it was trained on). Example: [domain]"))
    steps: PerStageCount = Field(..., description="Optimizer steps per distilled stage: one number or {I: 2000, II: 500}.")
    batch_size: PerStageCount | None = Field(None, description="Overrides optim.batch_size: one number or per stage.")
    lr: LRSpec = Field(default_factory=LRSpec, description=(
        "The student's own schedule (every student weight trains, so not the adapter's rate)."))
    weights: DistillWeights = Field(default_factory=DistillWeights)

    def data_phases(self, phases: list[PhaseSpec]) -> list[str]:
        return list(self.data) if self.data else [p.name for p in phases]

    def as_phase(self, data: DataSpec) -> PhaseSpec:
        """The distillation as one more training phase, named 'distill'."""
        return PhaseSpec(name=DISTILL_PHASE, data=data, steps=self.steps, batch_size=self.batch_size,
                         lr=self.lr)


DISTILL_PHASE = "distill"


class Recipe(Strict):
    name: str = Field(..., min_length=1)
    seed: int = Field(0, ge=0)
    output_dir: str = Field(..., description="Run directory. Example: runs/shapes-domain")
    cache_dir: str | None = Field(None, description="Cache for prepared data and text embeddings (default ~/.cache/finetune).")
    cascade: CascadeSpec = Field(default_factory=CascadeSpec)
    method: Literal["lora", "full"] = Field("lora", description=(
        "lora: train LoRA adapters (adaptation); full: train every UNet weight (pretraining a"
        " small cascade; the lora block is then unused)."))
    lora: LoraSpec = Field(default_factory=LoraSpec)
    losses: LossesSpec = Field(default_factory=LossesSpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    train: TrainSpec = Field(default_factory=TrainSpec)
    phases: list[PhaseSpec] = Field(..., min_length=1)
    logging: LoggingSpec = Field(default_factory=LoggingSpec, description=(
        "Metrics always go to RUN/metrics.jsonl; these add wandb and TensorBoard."))
    distill: DistillSpec | None = Field(None, description=(
        "After the phases, train a smaller student UNet per stage to imitate the trained stage."))
    eval: EvalSpec = Field(default_factory=EvalSpec, description="Evaluation after training (and of the base before it).")

    def distill_stages(self) -> list[str]:
        if self.distill is None:
            return []
        return self.distill.stages or list(self.cascade.stages)

    def distill_phase(self) -> PhaseSpec | None:
        """The distill block as a phase (its data is the named phase's data)."""
        if self.distill is None:
            return None
        first = self.distill.data_phases(self.phases)[0]
        source = next((p for p in self.phases if p.name == first), self.phases[-1])
        return self.distill.as_phase(source.data)

    def check(self) -> list[tuple[tuple, str]]:
        """Cross-field rules: (key path, message) for each violation."""
        problems: list[tuple[tuple, str]] = []
        lrs = [(("optim", "lr"), self.optim.lr)] + [
            (("phases", i, "lr"), p.lr) for i, p in enumerate(self.phases) if p.lr is not None]
        for loc, lr in lrs:
            if lr.end > lr.start:
                problems.append((loc + ("end",), f"lr.end ({lr.end}) is above lr.start ({lr.start}); the schedule only decays"))
        names = [p.name for p in self.phases]
        for i, name in enumerate(names):
            if name in names[:i]:
                problems.append((("phases", i, "name"), f"phase name '{name}' is used twice"))
        stages = self.cascade.stages
        if len(set(stages)) != len(stages):
            problems.append((("cascade", "stages"), "a stage is listed twice"))
        if not self.cascade.path and not self.cascade.stage_paths:
            problems.append((("cascade", "path"), "give cascade.path or cascade.stage_paths"))
        for i, phase in enumerate(self.phases):
            for stage in stages:
                batch = phase.batch_for(stage, self.optim.batch_size)
                if batch % self.optim.grad_accum:
                    problems.append((("phases", i, "batch_size") if phase.batch_size else ("optim", "batch_size"),
                                     f"batch size {batch} is not divisible by optim.grad_accum ({self.optim.grad_accum})"))
            problems += per_stage_problems(("phases", i, "steps"), phase.steps, stages,
                                           "give steps for every stage in cascade.stages (missing {missing})")
            problems += per_stage_problems(("phases", i, "batch_size"), phase.batch_size, stages)
        if self.method == "lora":
            for field in ("rank", "alpha"):
                problems += per_stage_problems(("lora", field), getattr(self.lora, field), stages,
                                               f"give a {field} for every adapted stage (missing {{missing}}), or one number for all")
        for i, phase in enumerate(self.phases):
            if phase.replay is not None:
                problems += [(("phases", i, "replay") + loc, message)
                             for loc, message in self._check_replay(i, phase.replay)]
        problems += self._check_distill()
        if self.train.ema.export == "ema" and self.train.ema.decay == 0:
            problems.append((("train", "ema", "export"), "export: ema needs train.ema.decay > 0 (e.g. 0.999)"))
        sii = self.train.stage_II
        if sii.noise_aug_min > sii.noise_aug_max:
            problems.append((("train", "stage_II", "noise_aug_min"), "noise_aug_min is above noise_aug_max"))
        return problems

    def replay_sources(self, index: int) -> list[str]:
        """The earlier phases whose data phase `index` replays."""
        replay = self.phases[index].replay
        if replay is None:
            return []
        return replay.phases if replay.phases is not None else [p.name for p in self.phases[:index]]

    def _check_replay(self, index: int, replay: ReplaySpec) -> list[tuple[tuple, str]]:
        earlier = [p.name for p in self.phases[:index]]
        if not earlier:
            return [((), "the first phase has no earlier phase to replay; remove replay here")]
        if replay.phases is not None and not replay.phases:
            return [(("phases",), "list at least one earlier phase, or leave phases out for all of them")]
        return [(("phases", j), f"'{name}' is not an earlier phase (earlier: {', '.join(earlier)})")
                for j, name in enumerate(replay.phases or []) if name not in earlier]

    def _check_distill(self) -> list[tuple[tuple, str]]:
        spec, problems = self.distill, []
        if spec is None:
            return problems
        stages = self.cascade.stages
        names = [p.name for p in self.phases]
        if DISTILL_PHASE in names:
            problems.append((("phases",), f"'{DISTILL_PHASE}' is the distill block's phase name; rename that phase"))
        for i, name in enumerate(spec.data or []):
            if name not in names:
                problems.append((("distill", "data", i), f"no phase named '{name}' (phases: {', '.join(names)})"))
        for stage in spec.stages or []:
            if stage not in stages:
                problems.append((("distill", "stages"), f"stage {stage} is not in cascade.stages ({', '.join(stages)})"))
        for field in ("steps", "batch_size"):
            per_stage = getattr(spec, field)
            if isinstance(per_stage, dict):
                missing = [s for s in self.distill_stages() if s not in per_stage]
                if field == "steps" and missing:
                    problems.append((("distill", field), f"give steps for every distilled stage (missing {', '.join(missing)})"))
        if spec.lr.end > spec.lr.start:
            problems.append((("distill", "lr", "end"), f"lr.end ({spec.lr.end}) is above lr.start ({spec.lr.start}); the schedule only decays"))
        if not any((spec.weights.task, spec.weights.output, spec.weights.feature)):
            problems.append((("distill", "weights"), "every weight is 0: nothing would train the student"))
        return problems
