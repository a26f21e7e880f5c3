"""The cascade: tokenizer + frozen text encoder + one UNet and scheduler per stage.

Read in diffusers' own DeepFloyd IF layout, component by component (so only what a step
needs is in memory):

    <cascade>/stage_I/    an `IFPipeline` folder (tokenizer, text_encoder, unet, scheduler)
    <cascade>/stage_II/   an `IFSuperResolutionPipeline` folder (+ image_noising_scheduler)

A stage may instead be given on its own (`cascade.stage_paths`) as a local folder or a hub id
(`DeepFloyd/IF-I-XL-v1.0`) that must already be in the local hub cache: nothing is ever
downloaded at run time. `builtin:` names are the kit's own tiny cascades (see BUILTIN_NAMES).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

STAGES = ("I", "II", "III")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
BUILTIN_PREFIX = "builtin:"
# builtin:tiny       the shipped pretrained tiny cascade (finetune/builtin/tiny: stage II from
#                    recipes/pretrain-tiny.yaml, stage I from recipes/pretrain-tiny-vpred.yaml
#                    continued by recipes/pretrain-tiny-count.yaml;
#                    see its README.md for how and how good)
# builtin:tiny-init  random weights, stage I attending at 8 and 4px: where the first pretraining starts
# builtin:tiny-init-attn16  the same with stage I attending at 16px too
# builtin:tiny-init-vpred   the same as tiny-init-attn16, predicting velocity instead of noise:
#                           the shipped stage I's start
# builtin:tiny-random the smallest IF-layout cascade, random: tests and smoke runs
SHIPPED_DIR = Path(__file__).parent / "builtin"
BUILTIN_BUILDS = {"tiny-random": dict(shape="test"), "tiny-init": dict(shape="base"),
                  "tiny-init-attn16": dict(shape="base-attn16"),
                  "tiny-init-vpred": dict(shape="base-attn16", prediction_type="v_prediction")}
BUILTIN_NAMES = ("tiny", *BUILTIN_BUILDS)


def default_cache_dir() -> Path:
    """Where the kit caches built cascades, prepared data and text embeddings."""
    return Path(os.environ.get("FINETUNE_CACHE", Path.home() / ".cache" / "finetune"))


# ----------------------------------------------------------------------------- tiny builder

# "test" is as small as diffusers allows (fast tests); "base" is the first pretrained tiny
# cascade's shape (32px stage I, x2 stage II): narrow at full resolution, attention only on the
# coarse grids, where it is cheap on a CPU and sees the whole image. The shipped stage I is
# "base-attn16" (its stage II is "base"'s).
TINY_SHAPES = {
    "test": {"I": dict(block_out_channels=[32, 64], attention=[False, True], norm_num_groups=32),
             "II": dict(block_out_channels=[32, 64], attention=[False, True], norm_num_groups=32)},
    "base": {"I": dict(block_out_channels=[16, 32, 64, 96], attention=[False, False, True, True],
                       norm_num_groups=8),
             "II": dict(block_out_channels=[16, 32, 64], attention=[False, False, True],
                        norm_num_groups=8)},
}
# stage I attends at 16px too: attention LoRA then reaches the level where an object's outline
# is drawn (docs/quickstart.md); same widths, about 30% more step time; stage II is "base"'s
TINY_SHAPES["base-attn16"] = {"I": dict(TINY_SHAPES["base"]["I"], attention=[False, True, True, True]),
                              "II": TINY_SHAPES["base"]["II"]}


def tiny_stage_configs(text_dim: int = 32, stage_i_size: int = 32, stage_ii_size: int = 64,
                       shape: str = "test"):
    """UNet configs of a tiny cascade: the block types and options of DeepFloyd IF."""
    def blocks(stage: str) -> dict:
        spec = dict(TINY_SHAPES[shape][stage])
        attention = spec.pop("attention")
        down = ["SimpleCrossAttnDownBlock2D" if a else "ResnetDownsampleBlock2D" for a in attention]
        up = ["SimpleCrossAttnUpBlock2D" if a else "ResnetUpsampleBlock2D" for a in reversed(attention)]
        return dict(spec, down_block_types=down, up_block_types=up)

    common = dict(
        layers_per_block=1,
        mid_block_type="UNetMidBlock2DSimpleCrossAttn",
        out_channels=6,  # epsilon and learned variance, as IF
        cross_attention_dim=64,
        encoder_hid_dim=text_dim,
        encoder_hid_dim_type="text_proj",
        attention_head_dim=16,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
        cross_attention_norm="group_norm",
        resnet_time_scale_shift="scale_shift",
        act_fn="gelu",
    )
    stage_i = dict(common, **blocks("I"), sample_size=stage_i_size, in_channels=3)
    stage_ii = dict(
        common,
        **blocks("II"),
        sample_size=stage_ii_size,
        in_channels=6,  # noisy target + upscaled low-resolution image
        class_embed_type="timestep",  # the noise-augmentation level of the low-res image
        mid_block_scale_factor=1.414,
        time_embedding_act_fn="gelu",
        time_embedding_dim=64,
    )
    return {"I": stage_i, "II": stage_ii}


def if_scheduler(prediction_type: str = "epsilon"):
    from diffusers import DDPMScheduler

    return DDPMScheduler(
        num_train_timesteps=1000,
        beta_schedule="squaredcos_cap_v2",
        thresholding=True,
        dynamic_thresholding_ratio=0.95,
        sample_max_value=1.0,
        prediction_type=prediction_type,
        variance_type="learned_range",
    )


def build_tiny(out_dir: str | os.PathLike, seed: int = 0, stage_i_size: int = 32,
               stage_ii_size: int = 64, text_dim: int = 32, shape: str = "test",
               prediction_type: str = "epsilon") -> Path:
    """Build a tiny random IF-layout cascade with diffusers/transformers classes and save it.
    Its UNets predict noise as IF's do, or velocity (`prediction_type="v_prediction"`).

    The result loads with stock `IFPipeline.from_pretrained(out_dir/"stage_I")` and
    `IFSuperResolutionPipeline.from_pretrained(out_dir/"stage_II")`.
    """
    import torch
    from diffusers import DDPMScheduler, IFPipeline, IFSuperResolutionPipeline, UNet2DConditionModel
    from transformers import T5Config, T5EncoderModel

    from .atomic import atomic_dir
    from .tiny_tokenizer import build_tokenizer

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    tokenizer = build_tokenizer()
    text_encoder = T5EncoderModel(T5Config(
        vocab_size=len(tokenizer), d_model=text_dim, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )).eval()
    configs = tiny_stage_configs(text_dim, stage_i_size, stage_ii_size, shape)
    unet_i = UNet2DConditionModel(**configs["I"])
    unet_ii = UNet2DConditionModel(**configs["II"])
    no_safety = dict(safety_checker=None, feature_extractor=None, watermarker=None,
                     requires_safety_checker=False)
    stage_i = IFPipeline(tokenizer=tokenizer, text_encoder=text_encoder, unet=unet_i,
                         scheduler=if_scheduler(prediction_type), **no_safety)
    stage_ii = IFSuperResolutionPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, unet=unet_ii, scheduler=if_scheduler(prediction_type),
        image_noising_scheduler=DDPMScheduler(num_train_timesteps=1000,
                                              beta_schedule="squaredcos_cap_v2"),
        **no_safety)
    with atomic_dir(out_dir) as tmp:
        stage_i.save_pretrained(tmp / "stage_I", safe_serialization=True)
        stage_ii.save_pretrained(tmp / "stage_II", safe_serialization=True)
        (tmp / "README.md").write_text(
            f"# tiny random IF-layout cascade\n\nBuilt by `finetune.cascade.build_tiny(seed={seed})`;"
            " random weights, for tests and smoke runs only.\n")
    return out_dir


# ----------------------------------------------------------------------------- resolution

def _resolve_hub(repo_id: str, revision: str | None, what: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(repo_id, revision=revision, local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError, ValueError) as exc:
        raise UserError(
            f"{what}: hub model '{repo_id}' is not in the local hub cache and nothing is downloaded"
            f" at run time; run `huggingface-cli download {repo_id}` on a machine with network and"
            f" copy the cache (HF_HOME), or point {what} at a local folder ({type(exc).__name__})"
        ) from None


def resolve_location(location: str, what: str, revision: str | None = None,
                     cache_dir: Path | None = None) -> Path:
    """Turn a recipe location (folder, hub id, builtin:NAME) into a local folder."""
    if location.startswith(BUILTIN_PREFIX):
        name = location[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_NAMES:
            raise UserError(f"{what}: unknown builtin cascade '{name}'; known: {', '.join(BUILTIN_NAMES)}")
        if name not in BUILTIN_BUILDS:
            shipped = SHIPPED_DIR / name
            if not (shipped / "stage_I").is_dir():
                raise UserError(f"{what}: the shipped cascade '{name}' is missing from {shipped};"
                                " reinstall the package (pip install -e .)")
            return shipped
        target = (cache_dir or default_cache_dir()) / "builtin" / name
        if not (target / "stage_I").is_dir():
            build_tiny(target, **BUILTIN_BUILDS[name])
        return target
    path = Path(location).expanduser()
    if path.exists():
        if not path.is_dir():
            raise UserError(f"{what}: '{location}' is a file; give a folder in the IF layout")
        return path
    if HUB_ID.match(location) and not location.startswith((".", "/")):
        return _resolve_hub(location, revision, what)
    raise UserError(f"{what}: folder '{location}' does not exist; give a local folder, a cached hub id or builtin:tiny-random")


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def require_safetensors(folder: Path, what: str) -> None:
    """Weights are read only from safetensors: a folder holding only pickle-based weight files
    is refused (unpickling runs arbitrary code), never loaded."""
    if not folder.is_dir() or any(folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise UserError(f"{what}: {folder / pickles[0]} is a pickle-based weight file; the kit loads"
                        " weights only from safetensors (pickle can run code when loaded); convert it"
                        " on a machine you trust, e.g. model.save_pretrained(dir, safe_serialization=True)")


@dataclass
class Cascade:
    """Local folders of each stage; components are loaded on demand."""

    stage_dirs: dict[str, Path]

    @classmethod
    def from_spec(cls, path: str | None = None, stage_paths: dict[str, str] | None = None,
                  revision: str | None = None, cache_dir: Path | None = None) -> "Cascade":
        stage_dirs: dict[str, Path] = {}
        if path:
            root = resolve_location(path, "cascade.path", revision, cache_dir)
            for stage in STAGES:
                if (root / f"stage_{stage}").is_dir():
                    stage_dirs[stage] = root / f"stage_{stage}"
            if not stage_dirs and (root / "model_index.json").exists():
                stage_dirs["I"] = root  # a single IFPipeline folder is a one-stage cascade
            if not stage_dirs:
                raise UserError(f"cascade.path: '{path}' has no stage_I/ or stage_II/ folder"
                                " (the IF layout) and is not a pipeline folder")
        for stage, location in (stage_paths or {}).items():
            stage_dirs[stage] = resolve_location(location, f"cascade.stage_paths.{stage}",
                                                 revision, cache_dir)
        for stage, folder in stage_dirs.items():
            if not (folder / "unet" / "config.json").exists():
                raise UserError(f"cascade stage {stage}: '{folder}' has no unet/config.json;"
                                " expected a diffusers IF pipeline folder")
            for part in ("unet", "text_encoder"):
                require_safetensors(folder / part, f"cascade stage {stage}")
        return cls(stage_dirs)

    # -- components -------------------------------------------------------------------------
    def _text_dir(self) -> Path:
        for stage in STAGES:
            folder = self.stage_dirs.get(stage)
            if folder and (folder / "text_encoder").is_dir():
                return folder
        raise UserError("cascade: no stage folder holds a text_encoder/ (IF stage I does)")

    def load_tokenizer(self):
        from transformers import T5Tokenizer

        return T5Tokenizer.from_pretrained(self._text_dir(), subfolder="tokenizer")

    def load_text_encoder(self, dtype=None):
        from transformers import T5EncoderModel

        model = T5EncoderModel.from_pretrained(self._text_dir(), subfolder="text_encoder",
                                               torch_dtype=dtype, use_safetensors=True)
        return model.eval().requires_grad_(False)

    def load_unet(self, stage: str, dtype=None):
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel.from_pretrained(self.stage_dirs[stage], subfolder="unet",
                                                    torch_dtype=dtype, use_safetensors=True)

    def text_dim(self) -> int:
        """Width of the text encoder's output (T5: d_model)."""
        config = json.loads((self._text_dir() / "text_encoder" / "config.json").read_text())
        return int(config.get("d_model") or config["hidden_size"])

    def unet_config(self, stage: str) -> dict:
        return json.loads((self.stage_dirs[stage] / "unet" / "config.json").read_text())

    def load_scheduler(self, stage: str):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_pretrained(self.stage_dirs[stage], subfolder="scheduler")

    def load_image_noising_scheduler(self, stage: str):
        from diffusers import DDPMScheduler

        folder = self.stage_dirs[stage] / "image_noising_scheduler"
        if not folder.is_dir():
            raise UserError(f"cascade stage {stage}: no image_noising_scheduler/ folder; a"
                            " super-resolution stage needs one (IFSuperResolutionPipeline layout)")
        return DDPMScheduler.from_pretrained(self.stage_dirs[stage], subfolder="image_noising_scheduler")

    def resolution(self, stage: str) -> int:
        return int(self.unet_config(stage)["sample_size"])

    def is_super_resolution(self, stage: str) -> bool:
        return int(self.unet_config(stage)["in_channels"]) == 6

    def text_encoder_identity(self) -> str:
        """A fingerprint of the text encoder: config plus the weight files' names and sizes
        and a hash of their first MiB (cheap even for T5-XXL's 9 GB, changes with any re-save)."""
        folder = self._text_dir() / "text_encoder"
        digest = hashlib.sha256((folder / "config.json").read_bytes())
        for weight in sorted(folder.glob("*.safetensors")):
            digest.update(weight.name.encode())
            digest.update(str(weight.stat().st_size).encode())
            with open(weight, "rb") as handle:
                digest.update(handle.read(1 << 20))
        return digest.hexdigest()[:16]
