"""The synthetic benchmark world: procedurally drawn shapes with captions a program can check.

Each image holds 1-3 copies of one shape in one colour on a background. One object is placed
in one of nine regions and its caption names the position ("a red circle at the top left");
several objects are captioned by count ("two blue squares"). Every image's ground truth
(shape, colour, count, position, style, background) is stored beside the caption, so a judge
can score generated images against their prompts.

Splits differ in controlled ways:
- `general`: the base shapes and colours, flat, on the plain grey background;
- `domain`: new shapes (star, cross) and a new colour (purple);
- `outline`: the general content in a new style ("an outline drawing of ...");
- `night`: the general content on a new background ("... on a black background").
Any split can also be drawn in another style or on another background (`style=`,
`background=`); captions name both whenever they differ from flat on plain, so the words
always say what the picture shows. `plural=` sets the share of images with two or three
objects (0.4 by default), for data that teaches counting more often.
`synth:SPLIT?n=256&size=64&seed=0&style=..&background=..&plural=..` in a recipe's `data.path`
materialises a split in the cache on first use.
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
from PIL import Image, ImageDraw

from finetune.atomic import atomic_dir
from finetune.errors import UserError

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220),
           "yellow": (240, 210, 20), "purple": (140, 40, 190), "orange": (245, 130, 20)}
BACKGROUND = (235, 235, 235)  # "plain"
# top and bottom colour of each background (equal for solid ones); a gradient stays subtle
# enough that the judge, which reads the background from the border, still separates objects
BACKGROUNDS = {"plain": (BACKGROUND, BACKGROUND), "white": ((255, 255, 255),) * 2,
               "black": ((20, 20, 20),) * 2, "gradient": ((245, 245, 245), (210, 222, 240))}
STYLES = ("flat", "outline")
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
PLURAL = 0.4  # share of scenes with two or three objects unless `plural=` says otherwise
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]

GENERAL = {"shapes": ["circle", "square", "triangle"], "colours": ["red", "green", "blue", "yellow"]}
# `stream` seeds each split's random numbers: fixed per split, so adding a split never
# changes the images of another
SPLITS = {
    "general": dict(GENERAL, stream=1),
    "domain": {"shapes": ["star", "cross"], "colours": ["red", "green", "blue", "yellow", "purple"],
               "stream": 0},
    "outline": dict(GENERAL, stream=2, style="outline"),
    "night": dict(GENERAL, stream=3, background="black"),
}


@dataclass
class Scene:
    shape: str
    colour: str
    count: int
    position: str | None  # "top left" ... for a single object
    style: str = "flat"
    background: str = "plain"

    def caption(self) -> str:
        if self.count == 1:
            text = f"a {self.colour} {self.shape} at the {self.position}"
        else:
            text = f"{COUNT_WORDS[self.count]} {self.colour} {self.shape}s"
        if self.style != "flat":
            text = f"an {self.style} drawing of {text}"
        if self.background != "plain":
            text = f"{text} on a {self.background} background"
        return text


def position_name(row: int, col: int) -> str:
    if row == 1 and col == 1:
        return "center"
    return f"{ROWS[row]} {COLS[col]}"


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        s = r * 0.85
        return [(cx - s, cy - s), (cx + s, cy - s), (cx + s, cy + s), (cx - s, cy + s)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a))
                for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else r * 0.45) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else r * 0.45) * math.sin(-math.pi / 2 + k * math.pi / 5))
                for k in range(10)]
    if shape == "cross":
        a, b = r, r * 0.35
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b),
                (cx + a, cy + b), (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a),
                (cx - b, cy + b), (cx - a, cy + b), (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(shape)


def render(scene: Scene, size: int, rng: np.random.Generator, supersample: int = 4) -> Image.Image:
    """Draw a scene (anti-aliased by supersampling)."""
    big = size * supersample
    img = _background(scene.background, big)
    draw = ImageDraw.Draw(img)
    colour = COLOURS[scene.colour]
    if scene.count == 1:
        row, col = (ROWS.index(scene.position.split()[0]), COLS.index(scene.position.split()[1])) \
            if scene.position != "center" else (1, 1)
        cell = big / 3
        r = cell * rng.uniform(0.34, 0.42)
        centres = [((col + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell,
                    (row + 0.5) * cell + rng.uniform(-0.06, 0.06) * cell)]
    else:
        r = big * rng.uniform(0.10, 0.13)
        slots = rng.permutation(9)[:scene.count]
        cell = big / 3
        centres = [((s % 3 + 0.5) * cell, (s // 3 + 0.5) * cell) for s in slots]
    # an outline's stroke is a fixed share of the radius, so it survives down-sampling
    stroke = max(1, round(r * 0.3)) if scene.style == "outline" else 0
    for cx, cy in centres:
        draw_shape(draw, scene.shape, cx, cy, r, colour, stroke)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _background(name: str, size: int) -> Image.Image:
    top, bottom = BACKGROUNDS[name]
    if top == bottom:
        return Image.new("RGB", (size, size), top)
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)[:, None, None]
    rows = (1 - ramp) * np.array(top, np.float32) + ramp * np.array(bottom, np.float32)
    return Image.fromarray(np.broadcast_to(rows, (size, size, 3)).round().astype(np.uint8))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill,
               stroke: int = 0) -> None:
    """One shape of circumradius `r` centred at (cx, cy), filled (stroke 0) or as an outline
    `stroke` pixels wide: shared by the renderer and the judge's templates, so both draw the
    same geometry."""
    if shape == "circle":
        box = [cx - r, cy - r, cx + r, cy + r]
        if stroke:
            draw.ellipse(box, outline=fill, width=stroke)
        else:
            draw.ellipse(box, fill=fill)
    elif stroke:
        draw.polygon(_polygon(shape, cx, cy, r), outline=fill, width=stroke)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def random_scene(rng: np.random.Generator, shapes: list[str], colours: list[str],
                 plural: float = PLURAL, style: str = "flat", background: str = "plain") -> Scene:
    shape = shapes[rng.integers(len(shapes))]
    colour = colours[rng.integers(len(colours))]
    if rng.random() < 1.0 - plural:  # (not `>= plural`: every split path keeps its old images)
        return Scene(shape, colour, 1, position_name(int(rng.integers(3)), int(rng.integers(3))),
                     style, background)
    return Scene(shape, colour, int(rng.integers(2, 4)), None, style, background)


def _look(split: str, style: str | None, background: str | None, where: str = "synth") -> tuple[dict, str, str]:
    """A split's content spec and its style and background (the split's own unless given)."""
    if split not in SPLITS:
        raise UserError(f"{where}: unknown synth split '{split}' (known: {', '.join(SPLITS)})")
    spec = SPLITS[split]
    style = style or spec.get("style", "flat")
    background = background or spec.get("background", "plain")
    if style not in STYLES:
        raise UserError(f"{where}: unknown synth style '{style}' (known: {', '.join(STYLES)})")
    if background not in BACKGROUNDS:
        raise UserError(f"{where}: unknown synth background '{background}' (known: {', '.join(BACKGROUNDS)})")
    return spec, style, background


def _plural_share(plural: float | None, where: str = "synth") -> float:
    if plural is None:
        return PLURAL
    if not 0.0 <= plural <= 1.0:
        raise UserError(f"{where}: synth parameter plural must be between 0 and 1 (the share of "
                        f"images with two or three objects), got {plural}")
    return plural


def _scene_maker(split: str, style: str | None, background: str | None, plural: float | None = None):
    """scene(rng) for a split: validated now, drawn later (write_split interleaves scene
    and rendering draws on one random stream, so scenes cannot be drawn ahead)."""
    spec, style, background = _look(split, style, background)
    share = _plural_share(plural)
    return lambda rng: random_scene(rng, spec["shapes"], spec["colours"], share, style, background)


def prompt_set(split: str, n: int, seed: int = 0, style: str | None = None,
               background: str | None = None, plural: float | None = None) -> list[Scene]:
    """Held-out prompts of a split with their ground truth (no images): what a generated
    image is judged against. Drawn from their own random stream, so a prompt set with the
    same seed as a training split does not repeat its scenes in order."""
    make = _scene_maker(split, style, background, plural)
    rng = np.random.default_rng([seed, SPLITS[split]["stream"], 1])
    return [make(rng) for _ in range(n)]


def write_split(out_dir: str | Path, split: str, n: int, size: int = 64, seed: int = 0,
                style: str | None = None, background: str | None = None,
                plural: float | None = None) -> Path:
    """Write `n` images of a split as an imagefolder (metadata.jsonl with ground truth)."""
    make = _scene_maker(split, style, background, plural)
    rng = np.random.default_rng([seed, SPLITS[split]["stream"]])
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        rows = []
        for i in range(n):
            scene = make(rng)
            name = f"{i:05d}.png"
            render(scene, size, rng).save(tmp / name)
            rows.append({"file_name": name, "text": scene.caption(), "truth": asdict(scene)})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def write_prompt_set(target: str | Path, split: str, n: int, seed: int = 0,
                     style: str | None = None, background: str | None = None,
                     plural: float | None = None) -> Path:
    """Held-out prompts of a split with their ground truth, one JSON object per line
    ({"prompt", "truth"}: what `eval.prompt_sets` and the judge read)."""
    from finetune.atomic import atomic_path

    target = Path(target)
    rows = [{"prompt": s.caption(), "truth": asdict(s)}
            for s in prompt_set(split, n, seed, style, background, plural)]
    with atomic_path(target) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


NUMBER_PARAMS = {"n": int, "size": int, "seed": int, "plural": float}
LOOK_PARAMS = ("style", "background")


def parse_synth_path(path: str) -> tuple[str, dict]:
    """`synth:SPLIT?n=..&size=..&seed=..&style=..&background=..&plural=..` -> (split, params).
    Style, background and plural appear in params only when given (the split's own
    otherwise), so the cache key of a path without them never changes."""
    body = path[len("synth:"):]
    split, _, query = body.partition("?")
    params: dict = {"n": 256, "size": 64, "seed": 0}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key in LOOK_PARAMS:
            params[key] = value
        elif key in NUMBER_PARAMS:
            kind = NUMBER_PARAMS[key]
            try:
                params[key] = kind(value)
            except ValueError:
                what = "an integer" if kind is int else "a number"
                raise UserError(f"{path}: synth parameter {key} must be {what}") from None
        else:
            known = ", ".join([*NUMBER_PARAMS, *LOOK_PARAMS])
            raise UserError(f"{path}: unknown synth parameter '{key}' ({known})")
    _look(split, params.get("style"), params.get("background"), path)  # names checked here, with the path
    _plural_share(params.get("plural"), path)
    return split, params


def synth_prompts(path: str) -> list[Scene]:
    """The held-out prompts a `synth:` prompt-set path names."""
    split, params = parse_synth_path(path)
    return prompt_set(split, params["n"], params["seed"], params.get("style"), params.get("background"),
                      params.get("plural"))


def materialize(path: str, cache_dir: Path) -> Path:
    """The folder of a `synth:` data path, generated on first use."""
    split, params = parse_synth_path(path)
    key = hashlib.sha1(json.dumps([split, params], sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_dir) / "synth" / f"{split}-{key}"
    if not (target / "metadata.jsonl").exists():
        write_split(target, split, **params)
    return target
