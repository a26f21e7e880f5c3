"""Evaluation of cascade variants (base, adapted, student) on held-out prompt sets.

A prompt set is `synth:SPLIT?n=48&seed=7` (the synthetic world's held-out prompts with ground
truth), a `.jsonl` file of {"prompt": ..., "truth": {...}} rows, or a `.txt` file with one
prompt per line (no ground truth: samples only). With ground truth, generated images are
scored by the synthetic world's judge (per attribute and overall).

Every variant draws prompt i from the same seed (see sampling.py), so the grids and the
numbers of "before" and "after" compare the same noise.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import UserError


@dataclass
class Prompt:
    text: str
    truth: dict | None = None


def load_prompt_set(spec: str, where: str = "eval.prompt_sets") -> list[Prompt]:
    if spec.startswith("synth:"):
        from data_tools.synth import synth_prompts

        return [Prompt(s.caption(), asdict(s)) for s in synth_prompts(spec)]
    path = Path(spec).expanduser()
    if not path.is_file():
        raise UserError(f"{where}: prompt file '{spec}' does not exist (give synth:SPLIT?n=..&seed=.., "
                        "a .jsonl of {\"prompt\", \"truth\"} rows or a .txt with one prompt per line)")
    prompts = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if path.suffix == ".jsonl":
            try:
                row = json.loads(line)
                prompts.append(Prompt(str(row["prompt"]), row.get("truth")))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{path}:{number}: expected a JSON object with a \"prompt\" key") from None
        else:
            prompts.append(Prompt(line.strip()))
    if not prompts:
        raise UserError(f"{path}: no prompts in the file")
    return prompts


def judge_images(images, prompts: list[Prompt]) -> dict[str, float] | None:
    """Judge accuracy per attribute, or None when the prompts carry no ground truth."""
    from data_tools.judge import accuracy

    judged = [(img, p.truth) for img, p in zip(images, prompts) if p.truth is not None]
    if not judged:
        return None
    result = accuracy([i for i, _ in judged], [t for _, t in judged])
    result["n"] = len(judged)
    return result


def settings_from(spec):
    from .sampling import SampleSettings

    return SampleSettings(**spec.model_dump())


def save_png(image, target: Path) -> Path:
    from .atomic import atomic_path

    with atomic_path(target) as tmp:
        image.save(tmp, format="PNG")
    return target


class References:
    """Real image-caption pairs for a prompt set, at any resolution: FID/KID's real images and
    the validation loss's data. A synth prompt set renders its own prompts' ground truth; a
    folder (eval.reference_images) is ingested and prepared like training data."""

    def __init__(self, captions: list[str], render):
        self.captions = captions
        self._render = render
        self._cache: dict[int, object] = {}

    def at(self, size: int):
        """(N, 3, size, size) uint8."""
        if size not in self._cache:
            self._cache[size] = self._render(size)
        return self._cache[size]

    def pil(self, size: int):
        from PIL import Image

        return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in self.at(size)]

    @classmethod
    def for_synth(cls, prompts: list[Prompt], seed: int = 0) -> "References":
        import numpy as np
        import torch

        from data_tools.synth import Scene, render

        scenes = [Scene(**p.truth) for p in prompts]

        def draw(size):
            rng = np.random.default_rng([seed, size])
            return torch.from_numpy(np.stack([np.asarray(render(s, size, rng)) for s in scenes])).permute(0, 3, 1, 2).contiguous()
        return cls([p.text for p in prompts], draw)

    @classmethod
    def for_folder(cls, folder: str, where: str) -> "References":
        from data_tools.ingest import ingest
        from data_tools.prepare import prepare

        path = Path(folder).expanduser()
        if not path.is_dir():
            raise UserError(f"{where}: reference folder '{folder}' does not exist")
        found = ingest(path)
        first = prepare(found.records, 64, None)
        if not first.captions:
            raise UserError(f"{where}: no usable image-caption pairs in '{folder}' (see finetune-data inspect)")
        refs = cls(first.captions, lambda size: prepare(found.records, size, None).pixels)
        refs._cache[64] = first.pixels  # already decoded: a 64px stage reuses it
        return refs


def references_for(spec, prompt_sets: dict[str, list[Prompt]], specs: dict[str, str]) -> dict[str, References]:
    refs = {}
    for name, prompts in prompt_sets.items():
        if name in spec.reference_images:
            refs[name] = References.for_folder(spec.reference_images[name], f"eval.reference_images.{name}")
        elif specs.get(name, "").startswith("synth:") and all(p.truth for p in prompts):
            refs[name] = References.for_synth(prompts, spec.sample.seed)
    return refs


def variant_metrics(sampler, images, prompts: list[Prompt], ref: References | None, spec, objectives,
                    extractor) -> dict:
    """Every metric of eval.metrics whose inputs exist, for one variant on one prompt set."""
    from data_tools.prepare import to_model_range

    from .metrics import clip_score, distribution_metrics, validation_loss

    wanted = spec.metrics
    scores = (judge_images(images, prompts) if "judge" in wanted else None) or {"n": len(prompts)}
    if ref is not None and ({"fid", "kid"} & set(wanted)):
        module, name = extractor
        scores.update(distribution_metrics(ref.pil(images[0].size[0]), images, module, wanted))
        scores["extractor"] = name
    if ref is not None and "val_loss" in wanted:
        embeds, _ = sampler.pipes["I"].encode_prompt(ref.captions, do_classifier_free_guidance=False,
                                                     device=sampler.device, clean_caption=False)
        for stage, pipe in sampler.pipes.items():
            pixels = to_model_range(ref.at(pipe.unet.config.sample_size))
            scores[f"val_loss_{stage}"] = validation_loss(pipe.unet, objectives[stage], pixels, embeds,
                                                          seed=spec.sample.seed)
    if spec.clip_model and "clip_score" in wanted:
        scores["clip_score"] = clip_score(images, [p.text for p in prompts], spec.clip_model)
    return scores


def evaluate_variants(cascade, variants, prompt_sets: dict[str, list[Prompt]], spec, out_dir: Path,
                      progress=None, references: dict[str, References] | None = None,
                      train=None) -> dict:
    """Sample every prompt set with every variant; write grids under out_dir/samples/ and
    return {set: {variant: metrics}}."""
    from .metrics import feature_extractor
    from .objective import stage_objective
    from .recipe.schema import TrainSpec
    from .sampling import CascadeSampler, image_grid

    settings = settings_from(spec.sample)
    references = references or {}
    extractor = feature_extractor(spec.feature_extractor) if references else None
    results: dict[str, dict] = {name: {} for name in prompt_sets}
    for variant in variants:
        sampler = CascadeSampler(cascade, variant, stages=spec.stages, adapter_scale=settings.adapter_scale)
        objectives = {stage: stage_objective(cascade, stage, train or TrainSpec()) for stage in sampler.pipes}
        for name, prompts in prompt_sets.items():
            bar = progress(len(prompts), f"sample {variant.name} / {name}") if progress else None
            images = sampler.generate([p.text for p in prompts], settings, bar)
            if bar is not None:
                bar.close()
            save_png(image_grid(images[:spec.grid]), out_dir / "samples" / variant.name / f"{name}.png")
            results[name][variant.name] = variant_metrics(sampler, images, prompts, references.get(name),
                                                          spec, objectives, extractor)
        del sampler
    return results


def trained_variant(run: Path, method: str):
    """The run's result as a sampling variant: its adapters, or its trained UNets."""
    from .sampling import CascadeVariant

    if method == "full":
        return CascadeVariant("trained", unets={p.name.split("_", 1)[1]: p / "unet"
                                                for p in sorted((run / "cascade").glob("stage_*"))})
    from .publish import run_adapters

    return CascadeVariant("adapted", adapters=run_adapters(run))


def student_variant(run: Path, trained):
    """The run with its distilled students in place of the stages they replace (the other
    stages keep the trained result), or None when the run has no students."""
    from .publish import run_students
    from .sampling import CascadeVariant

    folders = run_students(run)
    if not folders:
        return None
    return CascadeVariant("student",
                          adapters={s: a for s, a in trained.adapters.items() if s not in folders},
                          unets={**{s: u for s, u in trained.unets.items() if s not in folders}, **folders})


def trained_variants(run: Path, method: str) -> list:
    """What a finished run made: the trained cascade, and the student cascade when present."""
    trained = trained_variant(run, method)
    student = student_variant(run, trained)
    return [trained] + ([student] if student is not None else [])


def evaluate_run_dir(run: Path, cascade, spec, prompt_specs: dict[str, str], trained: list,
                     progress=None, say=print, train=None) -> dict:
    """Base (when spec.before) and the trained variants on each prompt set; writes eval.json."""
    import time

    from . import atomic
    from .sampling import CascadeVariant

    prompt_sets = {name: load_prompt_set(value, f"eval.prompt_sets.{name}")
                   for name, value in prompt_specs.items()}
    references = references_for(spec, prompt_sets, prompt_specs)
    variants = ([CascadeVariant("base")] if spec.before else []) + list(trained)
    started = time.time()
    results = evaluate_variants(cascade, variants, prompt_sets, spec, run, progress, references, train)
    atomic.write_json(run / "eval.json", {
        "results": results, "prompt_sets": prompt_specs, "sample": spec.sample.model_dump(),
        "variants": [v.name for v in variants], "seconds": round(time.time() - started, 1),
        "stages": spec.stages or sorted(cascade.stage_dirs)})
    for name, by_variant in results.items():
        say(f"eval {name}: " + "; ".join(
            f"{v} overall {r['overall']:.0%}" if "overall" in r else f"{v} sampled"
            for v, r in by_variant.items()))
    return results
