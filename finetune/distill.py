"""Distillation of a trained stage (the teacher) into a smaller student UNet.

Student shapes come from the teacher's config, in the manner of block-removed distillation
(BK-SDM, Kim et al. 2023): fewer layers per block, no mid block, fewer resolution levels,
narrower channels, in any combination (`distill.student` in the recipe).

Name mapping used to initialise the student from the teacher (`teacher_key`):

    down_blocks.i.{resnets,attentions}.j  <- the same i and j (the first layers are kept)
    up_blocks.i.{resnets,attentions}.j    <- up_blocks.(i + drop).… : j for the first
                                             layers, and the student's last layer from the
                                             teacher's last one (it takes the skip from the
                                             level above, so its shapes match)
    up_blocks.i.upsamplers / down_blocks.i.downsamplers   <- the same shift of i
    mid_block.…, conv_in, time/text embeddings, conv_out  <- the same name

where `drop` is `drop_levels` (the lowest-resolution levels are removed, so the student's up
block i is the teacher's up block i + drop). A tensor whose shape matches is copied.

With `init: teacher_narrowed`, a narrower student (channel_scale < 1) also keeps the
teacher's *leading* channels where shapes differ, as in width pruning: channel c of the
student is channel c of the teacher everywhere, so consecutive layers stay consistent. Three
layouts are not one run of channels and are narrowed part by part (`_parts`):

    up_blocks.i.resnets.j.{conv1, conv_shortcut}  input = cat(hidden, skip): the leading
      and norm1                                   channels of each part
    *.time_emb_proj (scale_shift), ff.net.0.proj  output = (scale, shift) or GEGLU's
                                                  (value, gate) halves: each half's leading
    time_embedding.linear_1, class_embedding      input = [cos | sin] of a sinusoidal
      .linear_1 (timestep)                        embedding whose width sets its frequency
                                                  grid: the teacher column of the nearest
                                                  frequency, in each half

Such a student starts much closer to the teacher, yet ended further from it after
distillation on the tiny cascade (docs/distillation.md), so the default `init: teacher`
copies matching shapes only and leaves the rest random; `init: random` copies nothing. `build_student` reports how
many tensors were copied, narrowed and left random.

The loss for one batch (weights from `distill.weights`, defaults 1, 1, 1):

    L = w_task · L_denoise(student)                       the usual stage loss on the data
      + w_out  · mean || s(x_t) - T(x_t) ||^2             all output channels (eps and variance)
      + w_feat · 1/|P| sum_(a,b) in P mean || proj_a(h_a^s) - h_b^T ||^2

with the teacher frozen (adapter fused), the same noisy input and conditioning for both, and
P the block pairs (student block, teacher block) of the name mapping whose outputs have the
same spatial size. When a pair's channel counts differ (channel_scale < 1), a 1x1 convolution
(proj_a, training-only, saved in checkpoints, not in the student) maps the student's features
to the teacher's width, as in FitNets. For a student narrowed from the teacher
(`init: teacher_narrowed`) it starts as the channel correspondence (student channel c ->
teacher channel c, the others 0) instead of at random.
"""
from __future__ import annotations

import copy
import math
import re

import torch

from .errors import UserError
from .unet_blocks import FeatureCapture, block_names

# Config keys that hold one value per level (trimmed when levels are dropped).
PER_LEVEL_KEYS = ("down_block_types", "block_out_channels", "attention_head_dim",
                  "num_attention_heads", "only_cross_attention", "transformer_layers_per_block",
                  "layers_per_block", "cross_attention_dim")


def _is_attention_level(block_type: str) -> bool:
    return "Attn" in block_type


def student_config(teacher: dict, spec) -> dict:
    """The student's UNet config: the teacher's with the spec's cuts applied."""
    cfg = copy.deepcopy(dict(teacher))
    cfg = {k: v for k, v in cfg.items() if not k.startswith("_")}
    levels = len(cfg["block_out_channels"])
    if spec.drop_levels >= levels:
        raise UserError(f"distill.student.drop_levels: the teacher has {levels} levels; "
                        f"at most {levels - 1} can be dropped")
    keep = levels - spec.drop_levels
    for key in PER_LEVEL_KEYS:
        if isinstance(cfg.get(key), (list, tuple)) and len(cfg[key]) == levels:
            cfg[key] = list(cfg[key])[:keep]
    cfg["up_block_types"] = list(cfg["up_block_types"])[spec.drop_levels:]
    if spec.layers_per_block is not None:
        cfg["layers_per_block"] = spec.layers_per_block
    if not spec.mid_block:
        cfg["mid_block_type"] = None
    if spec.channel_scale < 1.0:
        groups = cfg.get("norm_num_groups") or 32
        head = cfg.get("attention_head_dim") or 1
        channels = []
        for width, kind in zip(cfg["block_out_channels"], cfg["down_block_types"]):
            heads = head if isinstance(head, int) and _is_attention_level(kind) else 1
            step = math.lcm(groups, heads)
            channels.append(max(step, round(width * spec.channel_scale / step) * step))
        cfg["block_out_channels"] = channels
    return cfg


_BLOCK_KEY = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(.*)$")
_LAYER_KEY = re.compile(r"^(resnets|attentions)\.(\d+)\.(.*)$")


def _layers(cfg: dict, level: int) -> int:
    per = cfg["layers_per_block"]
    return per[level] if isinstance(per, (list, tuple)) else per


def teacher_key(key: str, teacher_cfg: dict, student_cfg: dict) -> str:
    """The teacher tensor a student tensor is initialised from (see the module docstring)."""
    match = _BLOCK_KEY.match(key)
    if not match:
        return key
    kind, index, rest = match.group(1), int(match.group(2)), match.group(3)
    drop = len(teacher_cfg["block_out_channels"]) - len(student_cfg["block_out_channels"])
    if kind == "up_blocks":
        levels_s = len(student_cfg["block_out_channels"])
        t_index = index + drop
        # up block i serves level (levels - 1 - i); its layer count is that level's + 1
        s_last = _layers(student_cfg, levels_s - 1 - index)
        t_last = _layers(teacher_cfg, levels_s - 1 - index)
        layer = _LAYER_KEY.match(rest)
        if layer and int(layer.group(2)) == s_last:
            rest = f"{layer.group(1)}.{t_last}.{layer.group(3)}"
        return f"up_blocks.{t_index}.{rest}"
    return key


_UP_INPUT = re.compile(r"^up_blocks\.(\d+)\.resnets\.(\d+)\.(conv1\.weight|conv_shortcut\.weight"
                       r"|norm1\.weight|norm1\.bias)$")
_HALVES = ("time_emb_proj.weight", "time_emb_proj.bias", "ff.net.0.proj.weight", "ff.net.0.proj.bias")
_SINUSOID_INPUT = ("time_embedding.linear_1.weight", "class_embedding.linear_1.weight")


def _up_resnet_inputs(cfg: dict, block: int, layer: int) -> list[int]:
    """[hidden, skip] channels concatenated at the input of an up resnet (diffusers'
    UNet2DConditionModel and its up blocks: the hidden state first, then the down path's skip)."""
    out = list(reversed(cfg["block_out_channels"]))
    levels = len(out)
    hidden = out[max(block - 1, 0)] if layer == 0 else out[block]
    last = _layers(cfg, levels - 1 - block)  # the block has last + 1 layers
    skip = out[min(block + 1, levels - 1)] if layer == last else out[block]
    return [hidden, skip]


def _parts(key: str, axis: int, size: int, cfg: dict) -> list[int]:
    """The sizes of the parts an axis concatenates (see the module docstring); [size] for one
    run of channels."""
    match = _UP_INPUT.match(key)
    if match and axis == (0 if "norm1" in key else 1):
        return _up_resnet_inputs(cfg, int(match.group(1)), int(match.group(2)))
    if axis == 0 and key.endswith(_HALVES) and size % 2 == 0 and (
            "ff.net" in key or cfg.get("resnet_time_scale_shift") == "scale_shift"):
        return [size // 2, size // 2]
    return [size]


def _sinusoid_columns(student: int, teacher: int, shift: float) -> torch.Tensor:
    """For each column of a `student`-wide sinusoidal timestep embedding, the column of the
    `teacher`-wide one with the nearest frequency. diffusers' get_timestep_embedding: half =
    width // 2 frequencies exp(-ln(10000) k / (half - shift)), k < half, once as cos, once as
    sin; equal frequencies at k_t = k_s (half_t - shift) / (half_s - shift)."""
    half_s, half_t = student // 2, teacher // 2
    k = torch.arange(half_s, dtype=torch.float64)
    nearest = (k * (half_t - shift) / (half_s - shift)).round().long().clamp(max=half_t - 1)
    return torch.cat([nearest, nearest + half_t])


def _axis_index(s_key: str, t_key: str, axis: int, size_s: int, size_t: int,
                s_cfg: dict, t_cfg: dict) -> torch.Tensor | None:
    """Which teacher entries along `axis` initialise the student's (None: no sound choice)."""
    sinusoid = (axis == 1 and size_s % 2 == 0 and size_t % 2 == 0 and s_key.endswith(_SINUSOID_INPUT)
                and (s_key.startswith("time_") or s_cfg.get("class_embed_type") == "timestep"))
    if sinusoid:
        return _sinusoid_columns(size_s, size_t, float(s_cfg.get("freq_shift") or 0))
    parts_s, parts_t = _parts(s_key, axis, size_s, s_cfg), _parts(t_key, axis, size_t, t_cfg)
    if (len(parts_s) != len(parts_t) or sum(parts_s) != size_s or sum(parts_t) != size_t
            or any(a > b for a, b in zip(parts_s, parts_t))):
        return None
    starts = [sum(parts_t[:i]) for i in range(len(parts_t))]
    return torch.cat([torch.arange(start, start + n) for start, n in zip(starts, parts_s)])


def narrow(s_key: str, t_key: str, origin: torch.Tensor, shape, s_cfg: dict, t_cfg: dict):
    """The teacher tensor `origin` cut to the student's `shape` (None when it cannot be)."""
    if origin.dim() != len(shape) or any(s > t for s, t in zip(shape, origin.shape)):
        return None
    out = origin
    for axis, (size_s, size_t) in enumerate(zip(shape, origin.shape)):
        if size_s != size_t:
            index = _axis_index(s_key, t_key, axis, size_s, size_t, s_cfg, t_cfg)
            if index is None:
                return None
            out = out.index_select(axis, index)
    return out.contiguous()


def build_student(teacher, spec, generator_seed: int = 0):
    """A student UNet for `teacher` (a UNet2DConditionModel) and a report of its start:
    {"copied": c, "narrowed": n, "random": r, "total": c + n + r} tensors."""
    from diffusers import UNet2DConditionModel

    cfg = student_config(teacher.config, spec)
    torch.manual_seed(generator_seed)
    student = UNet2DConditionModel.from_config(cfg)
    state = student.state_dict()
    copied, narrowed = {}, {}
    if spec.init != "random":
        source = teacher.state_dict()
        for key, value in state.items():
            t_key = teacher_key(key, teacher.config, cfg)
            origin = source.get(t_key)
            if origin is None:
                continue
            if origin.shape == value.shape:
                copied[key] = origin.detach().to(value.dtype)
            elif spec.init == "teacher_narrowed":
                cut = narrow(key, t_key, origin.detach(), value.shape, cfg, teacher.config)
                if cut is not None:
                    narrowed[key] = cut.to(value.dtype)
        student.load_state_dict({**copied, **narrowed}, strict=False)
    done = len(copied) + len(narrowed)
    return student, {"copied": len(copied), "narrowed": len(narrowed),
                     "random": len(state) - done, "total": len(state)}


def feature_pairs(teacher, student) -> list[tuple[str, str]]:
    """(student block, teacher block) names whose outputs correspond by the name mapping."""
    drop = len(teacher.config.block_out_channels) - len(student.config.block_out_channels)
    pairs = []
    for name in block_names(student):
        kind, _, index = name.partition(".")
        if kind == "up":
            pairs.append((name, f"up.{int(index) + drop}"))
        elif kind == "mid":
            if teacher.mid_block is not None:
                pairs.append((name, "mid"))
        else:
            pairs.append((name, name))
    return pairs


class Distiller:
    """The teacher, the hooks on both UNets and the projections of one distillation unit.

    Same interface as the contrastive term for the trainer: parameters(), state(), load(),
    close(), to(device)."""

    PREFIX = "distill_projection."

    def __init__(self, teacher, student, weights, probe: dict, aligned: bool = False):
        """`aligned`: the student's channel c is the teacher's channel c (teacher_narrowed), so
        each projection starts as that correspondence, not at random: a random one would
        pull the narrowed student's features away from the teacher's at the first steps."""
        self.teacher = teacher.requires_grad_(False).eval()
        self.weights = weights
        self.pairs: list[tuple[str, str]] = []
        self.projections = torch.nn.ModuleDict()
        if weights.feature > 0:
            self._match(student, probe, aligned)
        self.student_taps = FeatureCapture(student, [a for a, _ in self.pairs], "distill")
        self.teacher_taps = FeatureCapture(teacher, [b for _, b in self.pairs], "distill")

    @torch.no_grad()
    def _match(self, student, probe: dict, aligned: bool) -> None:
        """Keep the pairs whose outputs have the same spatial size (probed with one forward
        pass of each UNet); add a 1x1 projection where their widths differ."""
        candidates = feature_pairs(self.teacher, student)
        s_taps = FeatureCapture(student, [a for a, _ in candidates], "distill")
        t_taps = FeatureCapture(self.teacher, [b for _, b in candidates], "distill")
        try:
            student(**probe)
            self.teacher(**probe)
        finally:
            s_taps.remove()
            t_taps.remove()
        for a, b in candidates:
            hs, ht = s_taps.outputs[a], t_taps.outputs[b]
            if hs.shape[-2:] != ht.shape[-2:]:
                continue
            self.pairs.append((a, b))
            if hs.shape[1] != ht.shape[1]:
                projection = torch.nn.Conv2d(hs.shape[1], ht.shape[1], 1)
                if aligned and hs.shape[1] < ht.shape[1]:
                    projection.weight.zero_()
                    projection.bias.zero_()
                    projection.weight[:, :, 0, 0].fill_diagonal_(1.0)
                self.projections[a.replace(".", "_")] = projection

    def to(self, device):
        self.teacher.to(device)
        self.projections.to(device)
        return self

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.projections.parameters())

    def state(self) -> dict[str, torch.Tensor]:
        return {self.PREFIX + k: v.detach().cpu().contiguous()
                for k, v in self.projections.state_dict().items()}

    def load(self, tensors: dict[str, torch.Tensor]) -> None:
        if len(self.projections):
            self.projections.load_state_dict({k[len(self.PREFIX):]: v for k, v in tensors.items()
                                              if k.startswith(self.PREFIX)})

    def close(self) -> None:
        self.student_taps.remove()
        self.teacher_taps.remove()

    def feature_loss(self) -> torch.Tensor:
        """Per-sample mean over pairs of the feature MSE (reads the hooks of the last forward)."""
        terms = []
        for a, b in self.pairs:
            hs = self.student_taps.outputs[a].float()
            key = a.replace(".", "_")
            if key in self.projections:
                hs = self.projections[key](hs)
            terms.append((hs - self.teacher_taps.outputs[b].float()).pow(2).mean(dim=(1, 2, 3)))
        return torch.stack(terms, dim=1).mean(dim=1)


class DistillObjective:
    """A stage objective for the student: task + output + feature distillation terms.

    Wraps the stage's own objective, so caption dropout, the noise draws and stage II's
    noise-conditioning augmentation are those of adaptation."""

    def __init__(self, base, distiller: Distiller):
        self.base = base
        self.distiller = distiller

    def draw(self, images_shape, generator):
        return self.base.draw(images_shape, generator)

    def loss(self, student, images, text_embeds, draws):
        model_input, t, noise, x_t, kwargs = self.base.unet_inputs(images, draws)
        w = self.distiller.weights
        with torch.no_grad():
            target = self.distiller.teacher(model_input, t, encoder_hidden_states=text_embeds,
                                            **kwargs).sample
        out = student(model_input, t, encoder_hidden_states=text_embeds, **kwargs).sample
        task, metrics = self.base.prediction_loss(out, images, noise, x_t, t)
        output = (out.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
        loss = w.task * task + w.output * output
        metrics = {"loss_task": task.mean().detach(), "loss_output_kd": output.mean().detach(),
                   **metrics}
        if self.distiller.pairs and w.feature > 0:
            feature = self.distiller.feature_loss()
            loss = loss + w.feature * feature
            metrics["loss_feature_kd"] = feature.mean().detach()
        return loss, metrics


def probe_inputs(unet, objective, text_dim: int, tokens: int, device) -> dict:
    """One tiny batch of UNet inputs of the right shapes (for matching features)."""
    size = unet.config.sample_size
    images = torch.zeros(1, 3, size, size, device=device)
    gen = torch.Generator().manual_seed(0)
    draws = objective.draw(tuple(images.shape), gen)
    model_input, t, _, _, kwargs = objective.unet_inputs(images, draws)
    return dict(sample=model_input, timestep=t,
                encoder_hidden_states=torch.zeros(1, tokens, text_dim, device=device), **kwargs)
