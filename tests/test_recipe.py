"""Recipes: one pass reports every problem as file:line: key.path: message, exit code 2,
nothing written; --set overrides; ${ENV} expands; every shipped recipe validates."""
from __future__ import annotations

from pathlib import Path

import pytest

from finetune.cli import main
from finetune.errors import RecipeError
from finetune.recipe import load_recipe

REPO = Path(__file__).resolve().parents[1]


def _errors(path, overrides=None) -> list[str]:
    with pytest.raises(RecipeError) as info:
        load_recipe(path, overrides)
    return info.value.lines


def test_all_problems_reported_at_once_with_lines(tmp_path, synth_general):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"""name: t
output_dir: {tmp_path}/out
optim:
  lr: {{strat: 1.0e-4}}
  batch_size: -1
cascade: {{stages: [I, IV]}}
phases:
  - {{name: general, data: {{path: {synth_general}}}, steps: 0}}
""")
    lines = _errors(bad)
    assert f"{bad}:4: optim.lr.strat: unknown key; did you mean 'start'?" in lines
    assert any(line.startswith(f"{bad}:5: optim.batch_size:") and "greater than or equal to 1" in line for line in lines)
    assert any(line.startswith(f"{bad}:6: cascade.stages.1:") for line in lines)
    assert any(line.startswith(f"{bad}:8: phases.0.steps:") for line in lines)
    assert len(lines) == 4


def test_cross_field_and_missing_files(tmp_path, tiny_cascade):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"""name: t
output_dir: {tmp_path}/out
cascade: {{path: {tiny_cascade}, stages: [I, III]}}
optim: {{lr: {{start: 1.0e-5, end: 1.0e-4}}}}
phases:
  - {{name: general, data: {{path: {tmp_path}/nope}}, steps: 1}}
""")
    lines = _errors(bad)
    assert any(":4: optim.lr.end: lr.end" in line and "above lr.start" in line for line in lines)
    # resource checks run once the recipe itself is consistent
    bad.write_text(bad.read_text().replace("end: 1.0e-4", "end: 1.0e-6"))
    lines = _errors(bad)
    assert any(":6: phases.0.data.path: dataset folder" in line for line in lines)
    assert any(":3: cascade.stages.1: stage III is not in the cascade" in line for line in lines)


def test_yaml_syntax_error_has_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: t\nphases: [\n  {name: x\n")
    lines = _errors(bad)
    assert len(lines) == 1 and lines[0].startswith(f"{bad}:") and "YAML syntax error" in lines[0]


def test_duplicate_key_is_an_error(recipe_factory):
    path = recipe_factory(extra="seed: 3\n")
    lines = _errors(path)
    assert any("seed: key appears twice" in line for line in lines)


def test_set_overrides_any_key_and_reports_as_set(recipe_factory):
    path = recipe_factory()
    loaded = load_recipe(path, ["optim.lr.start=2.0e-4", "phases.1.steps=7", "cascade.stages=[I, II]"])
    assert loaded.recipe.optim.lr.start == 2e-4
    assert loaded.recipe.phases[1].steps == 7
    assert loaded.recipe.cascade.stages == ["I", "II"]
    assert load_recipe(path).hash != loaded.hash
    lines = _errors(path, ["optim.lr.strat=1"])
    assert lines == ["--set: optim.lr.strat: unknown key; did you mean 'start'?"]


def test_env_vars_expand_and_unset_is_an_error(recipe_factory, monkeypatch, tmp_path):
    path = recipe_factory()
    text = path.read_text().replace("name: test", "name: ${RUN_NAME}")
    path.write_text(text)
    monkeypatch.setenv("RUN_NAME", "from-env")
    assert load_recipe(path).recipe.name == "from-env"
    monkeypatch.delenv("RUN_NAME")
    lines = _errors(path)
    assert any(":2: name: environment variable ${RUN_NAME} is not set" in line for line in lines)


def test_cli_exit_code_2_no_traceback_nothing_written(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    out = tmp_path / "out"
    bad.write_text(f"name: t\noutput_dir: {out}\nphases: []\nlora: {{rnk: 4}}\n")
    for command in ("validate", "plan", "run"):
        assert main([command, str(bad)]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert "lora.rnk: unknown key; did you mean 'rank'?" in err
    assert not out.exists()


# recipes/accelerate/ holds accelerate launcher configs, not recipes.
SHIPPED = sorted(p for p in (REPO / "recipes").rglob("*.yaml") if "accelerate" not in p.parts)


def test_recipes_are_found():
    assert {p.name for p in SHIPPED} >= {"quickstart.yaml", "deepfloyd-if.yaml"}


@pytest.mark.parametrize("recipe", SHIPPED, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_recipe_validates(recipe):
    loaded = load_recipe(recipe, check_resources=False)
    assert loaded.recipe.phases
