"""From a finished run to something others use: a hub-ready adapter folder, or a merged cascade.

    finetune publish RUN [--out DIR] [--push REPO_ID]
        DIR/stage_I/pytorch_lora_weights.safetensors   (and stage_II/...) diffusers LoRA files,
                                                       metadata: base, rank, alpha, recipe hash,
                                                       data fingerprints, kit version
        DIR/README.md     model card: YAML front matter + evaluation + samples + usage snippet
        DIR/recipe.yaml   the resolved recipe
        DIR/samples/      the run's before/after grids
    finetune merge RUN --out DIR
        DIR/stage_I/, DIR/stage_II/   whole pipeline folders with the adapters fused in: they
                                      load with stock diffusers, no peft needed

The hub token (`--push`) is read by huggingface_hub from HF_TOKEN or its login; the kit
never prints, logs or writes it.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from . import adapters, atomic
from .cascade import BUILTIN_PREFIX, Cascade
from .errors import UserError
from .recipe.schema import LoraSpec


def _finished_run(run: Path) -> dict:
    if not (run / "finished.json").exists():
        raise UserError(f"{run}: not a finished run (no finished.json); finish it with "
                        "`finetune run RECIPE --resume` first")
    return yaml.safe_load((run / "resolved_recipe.yaml").read_text())


def run_cascade(run: Path) -> tuple[Cascade, dict]:
    recipe = _finished_run(run)
    spec = recipe["cascade"]
    cascade = Cascade.from_spec(spec.get("path"), spec.get("stage_paths") or {}, spec.get("revision"),
                                Path(recipe["cache_dir"]).expanduser() if recipe.get("cache_dir") else None)
    return cascade, recipe


def run_adapters(run: Path) -> dict[str, Path]:
    found = {p.name.split("_", 1)[1]: p for p in sorted((run / "adapters").glob("stage_*"))
             if (p / adapters.WEIGHT_NAME).exists()}
    if not found:
        raise UserError(f"{run}: no adapters/stage_*/{adapters.WEIGHT_NAME} (a LoRA run writes them)")
    return found


def base_ids(recipe: dict, cascade: Cascade) -> dict[str, str]:
    """What the card names as base model per stage: hub ids when the recipe gave them."""
    spec = recipe["cascade"]
    ids = {}
    for stage, folder in cascade.stage_dirs.items():
        given = (spec.get("stage_paths") or {}).get(stage)
        if given:
            ids[stage] = given
        elif spec.get("path", "").startswith(BUILTIN_PREFIX):
            ids[stage] = f"{spec['path']}/stage_{stage}"
        else:
            ids[stage] = str(folder)
    return ids


def base_license(cascade: Cascade) -> str | None:
    """The license in the base cascade's own model card front matter, when it has one."""
    for folder in list(cascade.stage_dirs.values()) + [next(iter(cascade.stage_dirs.values())).parent]:
        card = folder / "README.md"
        if card.exists() and card.read_text().startswith("---"):
            front = card.read_text().split("---")[1]
            try:
                meta = yaml.safe_load(front) or {}
            except yaml.YAMLError:
                continue
            if isinstance(meta, dict) and meta.get("license"):
                return str(meta["license"])
    return None


def _eval_lines(run: Path) -> list[str]:
    from .report import eval_table

    return eval_table(run)


def loadable_ids(recipe: dict, cascade: Cascade) -> dict[str, str]:
    """What stock diffusers' from_pretrained takes per stage: the hub id the recipe gave, or
    the local folder."""
    given = recipe["cascade"].get("stage_paths") or {}
    return {stage: given.get(stage, str(folder.resolve())) for stage, folder in cascade.stage_dirs.items()}


def example_prompt(recipe: dict) -> str:
    from .evaluate import load_prompt_set

    for spec in (recipe.get("eval", {}).get("prompt_sets") or {}).values():
        try:
            return load_prompt_set(spec)[0].text
        except UserError:
            continue
    return "a photo"


def usage_snippet(ids: dict[str, str], stages: list[str], recipe: dict, repo: str) -> str:
    sample = recipe.get("eval", {}).get("sample", {})
    base_i = ids["I"]
    lines = [
        "import torch",
        "from diffusers import IFPipeline, IFSuperResolutionPipeline",
        "",
        f'ADAPTERS = "{repo}"  # this folder, or its hub repo id',
        f'stage_1 = IFPipeline.from_pretrained("{base_i}", safety_checker=None, watermarker=None,',
        "                                      feature_extractor=None, requires_safety_checker=False)",
    ]
    if "I" in stages:
        lines.append('stage_1.load_lora_weights(ADAPTERS, subfolder="stage_I", '
                     f'weight_name="{adapters.WEIGHT_NAME}")')
    lines += [
        f"prompt = {example_prompt(recipe)!r}",
        "embeds, negative = stage_1.encode_prompt(prompt, clean_caption=False)",
        "generator = torch.Generator().manual_seed(0)",
        "image = stage_1(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=generator,",
        f"                num_inference_steps={sample.get('steps', 50)}, guidance_scale={sample.get('guidance_scale', 4.0)},"
        ' output_type="pt").images',
    ]
    if "II" in ids:
        lines += [
            f'stage_2 = IFSuperResolutionPipeline.from_pretrained("{ids["II"]}", text_encoder=None,',
            "    safety_checker=None, watermarker=None, feature_extractor=None, requires_safety_checker=False)",
        ]
        if "II" in stages:
            lines.append('stage_2.load_lora_weights(ADAPTERS, subfolder="stage_II", '
                         f'weight_name="{adapters.WEIGHT_NAME}")')
        lines += [
            "image = stage_2(image=image, prompt_embeds=embeds, negative_prompt_embeds=negative,",
            f"                generator=generator, num_inference_steps={sample.get('steps_II', 25)},"
            f" noise_level={sample.get('noise_level', 250)}, output_type=\"pil\").images[0]",
        ]
    else:
        lines.append("from diffusers.utils import pt_to_pil; image = pt_to_pil(image)[0]")
    lines.append('image.save("sample.png")')
    return "\n".join(lines)


def run_students(run: Path) -> dict[str, Path]:
    from .rundir import STUDENTS

    return {p.name.split("_", 1)[1]: p for p in sorted((run / STUDENTS).glob("stage_*"))
            if (p / "config.json").exists()}


def student_lines(students: list[str], repo: str) -> list[str]:
    """The card's section on distilled students: what they are and how to swap one in."""
    if not students:
        return []
    return ["## Distilled students", "",
            f"Smaller UNets distilled from the adapted stage(s) {', '.join(students)} (see the"
            " evaluation table's `student` row), as `save_pretrained` folders under `students/`."
            " They replace the stage's UNet in the stock pipeline, with no adapter:", "",
            "```python",
            "from diffusers import IFPipeline, UNet2DConditionModel",
            f'student = UNet2DConditionModel.from_pretrained("{repo}", subfolder="students/stage_{students[0]}")',
            f'pipe = IFPipeline.from_pretrained(BASE_STAGE_{students[0]}, unet=student)  # the base stage folder or hub id',
            "```", ""]


def model_card(run: Path, recipe: dict, cascade: Cascade, stages: list[str], repo: str,
               samples: list[Path], students: list[str] | None = None) -> str:
    ids = base_ids(recipe, cascade)
    triggers = sorted({(p.get("data", {}).get("caption_prefix") or "").strip()
                       for p in recipe["phases"]} - {""})
    sample = recipe.get("eval", {}).get("sample", {})
    front = {
        "base_model": [ids[s] for s in sorted(ids)],
        "library_name": "diffusers",
        "pipeline_tag": "text-to-image",
        "tags": ["lora", "deepfloyd-if", "text-to-image", "diffusers", "cascade-adaptation-kit"],
        "instance_prompt": triggers[0] if triggers else None,
    }
    licence = base_license(cascade)
    if licence:
        front["license"] = licence
    lora = LoraSpec.model_validate(recipe.get("lora", {}))
    body = [
        f"# {recipe['name']}: LoRA adapters for an IF-layout cascade",
        "",
        f"LoRA adapters for stage(s) {', '.join(stages)} ({lora.describe(stages)}), trained by the cascade adaptation kit in "
        f"{len(recipe['phases'])} phase(s): " + ", ".join(p["name"] for p in recipe["phases"]) + ".",
        "",
        "## Recommended settings",
        "",
        f"- adapter scale {sample.get('adapter_scale', 1.0)}",
        f"- stage I: {sample.get('steps', 50)} steps, guidance {sample.get('guidance_scale', 4.0)}; "
        f"stage II: {sample.get('steps_II', 25)} steps, guidance {sample.get('guidance_scale_II', 4.0)}, "
        f"noise level {sample.get('noise_level', 250)} (the stock DDPM scheduler of each stage)",
        f"- trigger words: {', '.join(triggers) if triggers else 'none'}",
        "",
        "## Evaluation",
        "",
        *_eval_lines(run),
        "",
    ]
    if samples:
        body += ["## Samples", ""] + [f"![{p.parent.name} {p.stem}]({p.as_posix()})" for p in samples] + [""]
    body += ["## Usage", "", "```python", usage_snippet(loadable_ids(recipe, cascade), stages, recipe, repo),
             "```", "", *student_lines(students or [], repo),
             "The recipe that produced these adapters is `recipe.yaml`."]
    return "---\n" + yaml.safe_dump({k: v for k, v in front.items() if v is not None},
                                    sort_keys=False) + "---\n" + "\n".join(body) + "\n"


def publish(run: Path, out: Path, repo: str | None = None) -> Path:
    cascade, recipe = run_cascade(run)
    found = run_adapters(run)
    with atomic.atomic_dir(out) as tmp:
        for stage, folder in found.items():
            (tmp / f"stage_{stage}").mkdir()
            shutil.copyfile(folder / adapters.WEIGHT_NAME, tmp / f"stage_{stage}" / adapters.WEIGHT_NAME)
        students = run_students(run)
        for stage, folder in students.items():
            shutil.copytree(folder, tmp / "students" / f"stage_{stage}",
                            ignore=shutil.ignore_patterns("finetune.json"))
        samples = []
        for grid in sorted((run / "samples").glob("*/*.png")) if (run / "samples").exists() else []:
            target = Path("samples") / grid.parent.name / grid.name
            (tmp / target).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(grid, tmp / target)
            samples.append(target)
        shutil.copyfile(run / "resolved_recipe.yaml", tmp / "recipe.yaml")
        if (run / "eval.json").exists():
            shutil.copyfile(run / "eval.json", tmp / "eval.json")
        (tmp / "README.md").write_text(model_card(run, recipe, cascade, sorted(found), repo or ".", samples,
                                                  sorted(students)))
    return out


def push(folder: Path, repo_id: str, private: bool = False) -> str:
    """Upload with huggingface_hub; the token comes from HF_TOKEN or the user's login."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, exist_ok=True, private=private)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message="Upload LoRA adapters")
    return f"https://huggingface.co/{repo_id}"


def merge(run: Path, out: Path, scale: float = 1.0) -> Path:
    """Fuse the run's adapters into whole pipeline folders (no peft needed to load them)."""
    from diffusers import IFPipeline, IFSuperResolutionPipeline

    cascade, _ = run_cascade(run)
    found = run_adapters(run)
    kinds = {"I": IFPipeline, "II": IFSuperResolutionPipeline}
    with atomic.atomic_dir(out) as tmp:
        for stage, folder in cascade.stage_dirs.items():
            pipe = kinds[stage].from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                watermarker=None, requires_safety_checker=False,
                                                use_safetensors=True)
            if stage in found:
                pipe.load_lora_weights(str(found[stage]))
                pipe.fuse_lora(components=["unet"], lora_scale=scale)
                pipe.unload_lora_weights()
            pipe.save_pretrained(tmp / f"stage_{stage}", safe_serialization=True)
        (tmp / "merged.json").write_text(json.dumps({
            "run": str(run), "adapter_scale": scale, "stages_adapted": sorted(found)}, indent=2))
    return out

