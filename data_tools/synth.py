"""The synthetic benchmark world: procedurally drawn shapes with captions a program can check.

Each image holds 1-3 copies of one shape in one colour on a plain background. One object is
placed in one of nine regions and its caption names the position ("a red circle at the top
left"); several objects are captioned by count ("two blue squares"). Every image's ground
truth (shape, colour, count, position) is stored beside the caption, so a judge can score
generated images against their prompts.

Splits differ in controlled ways: `general` uses the base shapes and colours; `domain`
introduces shapes (star, cross) and a colour (purple) the general split never shows.
`synth:SPLIT?n=256&size=64&seed=0` in a recipe's `data.path` materialises a split in the
cache on first use.
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
BACKGROUND = (235, 235, 235)
COUNT_WORDS = {1: "a", 2: "two", 3: "three"}
ROWS = ["top", "middle", "bottom"]
COLS = ["left", "center", "right"]

SPLITS = {
    "general": {"shapes": ["circle", "square", "triangle"], "colours": ["red", "green", "blue", "yellow"]},
    "domain": {"shapes": ["star", "cross"], "colours": ["red", "green", "blue", "yellow", "purple"]},
}


@dataclass
class Scene:
    shape: str
    colour: str
    count: int
    position: str | None  # "top left" ... for a single object

    def caption(self) -> str:
        if self.count == 1:
            return f"a {self.colour} {self.shape} at the {self.position}"
        return f"{COUNT_WORDS[self.count]} {self.colour} {self.shape}s"


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
    img = Image.new("RGB", (big, big), BACKGROUND)
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
    for cx, cy in centres:
        draw_shape(draw, scene.shape, cx, cy, r, colour)
    return img.resize((size, size), Image.Resampling.LANCZOS)


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    """One shape of circumradius `r` centred at (cx, cy): shared by the renderer and the
    judge's templates, so both draw the same geometry."""
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        draw.polygon(_polygon(shape, cx, cy, r), fill=fill)


def random_scene(rng: np.random.Generator, shapes: list[str], colours: list[str],
                 single_fraction: float = 0.6) -> Scene:
    shape = shapes[rng.integers(len(shapes))]
    colour = colours[rng.integers(len(colours))]
    if rng.random() < single_fraction:
        return Scene(shape, colour, 1, position_name(int(rng.integers(3)), int(rng.integers(3))))
    return Scene(shape, colour, int(rng.integers(2, 4)), None)


def prompt_set(split: str, n: int, seed: int = 0) -> list[Scene]:
    """Held-out prompts of a split with their ground truth (no images): what a generated
    image is judged against. Drawn from their own random stream, so a prompt set with the
    same seed as a training split does not repeat its scenes in order."""
    if split not in SPLITS:
        raise UserError(f"synth: unknown split '{split}' (known: {', '.join(SPLITS)})")
    rng = np.random.default_rng([seed, sorted(SPLITS).index(split), 1])
    spec = SPLITS[split]
    return [random_scene(rng, spec["shapes"], spec["colours"]) for _ in range(n)]


def write_split(out_dir: str | Path, split: str, n: int, size: int = 64, seed: int = 0) -> Path:
    """Write `n` images of a split as an imagefolder (metadata.jsonl with ground truth)."""
    if split not in SPLITS:
        raise UserError(f"synth: unknown split '{split}' (known: {', '.join(SPLITS)})")
    rng = np.random.default_rng([seed, sorted(SPLITS).index(split)])
    spec = SPLITS[split]
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        rows = []
        for i in range(n):
            scene = random_scene(rng, spec["shapes"], spec["colours"])
            name = f"{i:05d}.png"
            render(scene, size, rng).save(tmp / name)
            rows.append({"file_name": name, "text": scene.caption(), "truth": asdict(scene)})
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return out_dir


def write_prompt_set(target: str | Path, split: str, n: int, seed: int = 0) -> Path:
    """Held-out prompts of a split with their ground truth, one JSON object per line
    ({"prompt", "truth"}: what `eval.prompt_sets` and the judge read)."""
    from finetune.atomic import atomic_path

    target = Path(target)
    rows = [{"prompt": s.caption(), "truth": asdict(s)} for s in prompt_set(split, n, seed)]
    with atomic_path(target) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return target


def parse_synth_path(path: str) -> tuple[str, dict]:
    body = path[len("synth:"):]
    split, _, query = body.partition("?")
    params = {"n": 256, "size": 64, "seed": 0}
    for key, value in parse_qsl(query, keep_blank_values=True):
        if key not in params:
            raise UserError(f"{path}: unknown synth parameter '{key}' (n, size, seed)")
        try:
            params[key] = int(value)
        except ValueError:
            raise UserError(f"{path}: synth parameter {key} must be an integer") from None
    return split, params


def materialize(path: str, cache_dir: Path) -> Path:
    """The folder of a `synth:` data path, generated on first use."""
    split, params = parse_synth_path(path)
    key = hashlib.sha1(json.dumps([split, params], sort_keys=True).encode()).hexdigest()[:12]
    target = Path(cache_dir) / "synth" / f"{split}-{key}"
    if not (target / "metadata.jsonl").exists():
        write_split(target, split, params["n"], params["size"], params["seed"])
    return target
