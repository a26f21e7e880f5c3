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
        from data_tools.synth import parse_synth_path, prompt_set

        split, params = parse_synth_path(spec)
        return [Prompt(s.caption(), asdict(s)) for s in prompt_set(split, params["n"], params["seed"])]
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


def evaluate_variants(cascade, variants, prompt_sets: dict[str, list[Prompt]], settings,
                      out_dir: Path, grid: int = 16, progress=None, stages: list[str] | None = None) -> dict:
    """Sample every prompt set with every variant; write grids under out_dir/samples/ and
    return {set: {variant: judge accuracy (or just n)}}."""
    from .sampling import CascadeSampler, image_grid

    results: dict[str, dict] = {name: {} for name in prompt_sets}
    for variant in variants:
        sampler = CascadeSampler(cascade, variant, stages=stages, adapter_scale=settings.adapter_scale)
        for name, prompts in prompt_sets.items():
            bar = progress(len(prompts), f"sample {variant.name} / {name}") if progress else None
            images = sampler.generate([p.text for p in prompts], settings, bar)
            if bar is not None:
                bar.close()
            save_png(image_grid(images[:grid]), out_dir / "samples" / variant.name / f"{name}.png")
            scores = judge_images(images, prompts)
            results[name][variant.name] = scores if scores is not None else {"n": len(prompts)}
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
    from .rundir import STUDENTS
    from .sampling import CascadeVariant

    folders = {p.name.split("_", 1)[1]: p for p in sorted((run / STUDENTS).glob("stage_*"))
               if (p / "config.json").exists()}
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
                     progress=None, say=print) -> dict:
    """Base (when spec.before) and the trained variants on each prompt set; writes eval.json."""
    import time

    from . import atomic
    from .sampling import CascadeVariant

    prompt_sets = {name: load_prompt_set(value, f"eval.prompt_sets.{name}")
                   for name, value in prompt_specs.items()}
    variants = ([CascadeVariant("base")] if spec.before else []) + list(trained)
    started = time.time()
    results = evaluate_variants(cascade, variants, prompt_sets, settings_from(spec.sample), run,
                                spec.grid, progress, spec.stages)
    atomic.write_json(run / "eval.json", {
        "results": results, "prompt_sets": prompt_specs, "sample": spec.sample.model_dump(),
        "variants": [v.name for v in variants], "seconds": round(time.time() - started, 1),
        "stages": spec.stages or sorted(cascade.stage_dirs)})
    for name, by_variant in results.items():
        say(f"eval {name}: " + "; ".join(
            f"{v} overall {r['overall']:.0%}" if "overall" in r else f"{v} sampled"
            for v, r in by_variant.items()))
    return results
