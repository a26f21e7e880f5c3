"""The judge is right: >95% per attribute on freshly drawn ground truth, at 64px and at the
32px of the tiny cascade's stage I (where stars have arms two pixels wide), near chance on
shuffled prompts."""
from __future__ import annotations

import json
import random
from dataclasses import asdict

import numpy as np
import pytest

from data_tools.judge import accuracy
from data_tools.synth import SPLITS, random_scene, render

SHAPES = SPLITS["general"]["shapes"] + SPLITS["domain"]["shapes"]
COLOURS = SPLITS["domain"]["colours"]


def _world(n=200, size=64, seed=11):
    rng = np.random.default_rng(seed)
    scenes = [random_scene(rng, SHAPES, COLOURS) for _ in range(n)]
    return [render(s, size, rng) for s in scenes], [asdict(s) for s in scenes]


@pytest.mark.parametrize("size", [32, 64])
def test_judge_scores_ground_truth_above_95_percent(size):
    images, truths = _world(size=size)
    scores = accuracy(images, truths)
    for attribute in ("colour", "shape", "count", "position"):
        assert scores[attribute] > 0.95, (attribute, scores)


@pytest.mark.parametrize("size", [32, 64])
def test_judge_is_near_chance_on_shuffled_prompts(size):
    images, truths = _world(size=size)
    shuffled = truths[:]
    random.Random(0).shuffle(shuffled)
    scores = accuracy(images, shuffled)
    # chance: 1/5 colours, 1/5 shapes, 1/9 positions; count is 60% single objects
    assert scores["colour"] < 0.35 and scores["shape"] < 0.35 and scores["position"] < 0.25
    assert scores["overall"] < 0.05


def test_blank_image_fails_every_attribute():
    from PIL import Image

    from data_tools.judge import judge

    blank = Image.new("RGB", (64, 64), (235, 235, 235))
    verdict = judge(blank, {"shape": "circle", "colour": "red", "count": 1, "position": "center"})
    assert not any(verdict.values())


def test_synth_and_judge_commands(tmp_path, capsys):
    import json

    from data_tools.cli import main

    assert main(["synth", str(tmp_path / "d"), "--split", "domain", "-n", "40"]) == 0
    assert main(["judge", str(tmp_path / "d"), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert scores["overall"] > 0.95
    assert main(["judge", str(tmp_path)]) == 2


def test_synth_writes_held_out_prompts_with_truth_that_eval_reads_and_the_judge_confirms(tmp_path, capsys):
    from data_tools.cli import main
    from finetune.evaluate import References, judge_images, load_prompt_set

    target = tmp_path / "heldout.jsonl"
    assert main(["synth", str(tmp_path / "d"), "--split", "domain", "-n", "4",
                 "--heldout", str(target), "--heldout-n", "30"]) == 0
    assert str(target) in capsys.readouterr().out
    prompts = load_prompt_set(str(target))
    assert len(prompts) == 30 and all(p.truth for p in prompts)
    # drawing each prompt's ground truth gives images the judge accepts: the truth is right
    images = References.for_synth(prompts).pil(64)
    assert judge_images(images, prompts)["overall"] > 0.95


# the looks: a new style, a new background, and other splits drawn on other backgrounds
LOOKS = [("outline", None), ("night", None), ("general", "gradient"), ("domain", "white"),
         ("outline", "black")]


def _looks_world(split, background, size, n=60, seed=5):
    from data_tools.synth import prompt_set

    scenes = prompt_set(split, n, seed=seed, background=background)
    rng = np.random.default_rng(seed)
    return [render(s, size, rng) for s in scenes], [asdict(s) for s in scenes]


@pytest.mark.parametrize("split,background", LOOKS)
@pytest.mark.parametrize("size", [32, 64])
def test_judge_is_right_in_every_style_and_on_every_background(split, background, size):
    images, truths = _looks_world(split, background, size)
    scores = accuracy(images, truths)
    for attribute in ("colour", "shape", "count", "position"):
        assert scores[attribute] > 0.95, (attribute, scores)
    shuffled = truths[:]
    random.Random(1).shuffle(shuffled)
    assert accuracy(images, shuffled)["overall"] < 0.1


def test_captions_say_the_style_and_background_they_show():
    from data_tools.synth import Scene, prompt_set

    scene = Scene("star", "purple", 1, "top left", "outline", "black")
    assert scene.caption() == "an outline drawing of a purple star at the top left on a black background"
    assert Scene("circle", "red", 2, None).caption() == "two red circles"  # flat on plain: unchanged
    assert all(s.style == "outline" and s.caption().startswith("an outline drawing of ")
               for s in prompt_set("outline", 20))
    assert all(s.background == "black" and s.caption().endswith(" on a black background")
               for s in prompt_set("night", 20))
    general = prompt_set("general", 20, seed=4)
    assert all(" drawing " not in s.caption() and "background" not in s.caption() for s in general)
    # naming a split's own look changes nothing; another background changes only the look
    assert prompt_set("general", 20, seed=4, style="flat", background="plain") == general
    white = prompt_set("general", 20, seed=4, background="white")
    assert [(s.shape, s.colour, s.count, s.position) for s in white] == \
        [(s.shape, s.colour, s.count, s.position) for s in general]


def test_an_outline_is_hollow_and_a_background_is_drawn():
    from data_tools.synth import BACKGROUNDS, Scene

    flat = np.asarray(render(Scene("circle", "red", 1, "center"), 64, np.random.default_rng(0)))
    hollow = np.asarray(render(Scene("circle", "red", 1, "center", "outline"), 64, np.random.default_rng(0)))
    assert tuple(flat[32, 32]) == (220, 30, 30)
    assert tuple(hollow[32, 32]) == (235, 235, 235)
    dark = np.asarray(render(Scene("circle", "red", 1, "center", background="black"), 64, np.random.default_rng(0)))
    assert tuple(dark[0, 0]) == BACKGROUNDS["black"][0]
    ramp = np.asarray(render(Scene("circle", "red", 1, "center", background="gradient"), 64, np.random.default_rng(0)))
    assert ramp[0, 0].sum() > ramp[-1, 0].sum()  # light at the top, bluer below


def test_unknown_looks_are_refused_with_the_known_names(tmp_path, capsys):
    from data_tools.cli import main
    from data_tools.synth import parse_synth_path
    from finetune.errors import UserError

    with pytest.raises(UserError, match="unknown synth background 'moon'.*plain, white, black, gradient"):
        parse_synth_path("synth:general?background=moon")
    with pytest.raises(UserError, match="unknown synth style 'sketchy'.*flat, outline"):
        parse_synth_path("synth:general?style=sketchy")
    assert parse_synth_path("synth:outline?n=8&background=white") == \
        ("outline", {"n": 8, "size": 64, "seed": 0, "background": "white"})
    assert main(["synth", str(tmp_path / "x"), "--style", "sketchy"]) == 2
    assert "unknown synth style 'sketchy'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_synth_command_draws_a_style_domain_the_judge_confirms(tmp_path, capsys):
    import json

    from data_tools.cli import main

    assert main(["synth", str(tmp_path / "o"), "--split", "outline", "--background", "gradient",
                 "-n", "30", "--size", "32"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "o" / "metadata.jsonl").read_text().splitlines()]
    assert all(r["truth"]["style"] == "outline" and r["truth"]["background"] == "gradient" for r in rows)
    assert all(r["text"].endswith("on a gradient background") for r in rows)
    capsys.readouterr()
    assert main(["judge", str(tmp_path / "o"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["overall"] > 0.95


def test_plural_sets_the_share_of_counted_scenes_and_leaves_existing_paths_alone(tmp_path):
    from data_tools.synth import parse_synth_path, prompt_set, synth_prompts, write_split
    from finetune.errors import UserError

    # the images of a path without plural= are the ones every earlier run trained on
    assert [s.caption() for s in prompt_set("general", 6, seed=4)] == [
        "a green triangle at the center", "three red squares", "a green square at the bottom left",
        "two green triangles", "three red circles", "a red circle at the middle right"]
    assert prompt_set("general", 40, seed=4, plural=0.4) == prompt_set("general", 40, seed=4)
    share = lambda scenes: sum(s.count > 1 for s in scenes) / len(scenes)
    assert share(synth_prompts("synth:general?n=2000&seed=3&plural=0.7")) == pytest.approx(0.7, abs=0.03)
    assert share(prompt_set("domain", 50, plural=1.0)) == 1.0
    assert share(prompt_set("domain", 50, plural=0.0)) == 0.0
    folder = write_split(tmp_path / "p", "general", n=12, size=32, seed=1, plural=1.0)
    assert all(row["truth"]["count"] > 1 for row in
               map(json.loads, (folder / "metadata.jsonl").read_text().splitlines()))
    assert "plural" not in parse_synth_path("synth:general?n=8")[1]  # so its cache key is unchanged
    with pytest.raises(UserError, match=r"synth:general\?plural=1.5: .*plural must be between 0 and 1"):
        parse_synth_path("synth:general?plural=1.5")
    with pytest.raises(UserError, match="plural must be a number"):
        parse_synth_path("synth:general?plural=many")
