"""The bad-input corpus: malformed recipes and datasets. Every one gives a clear error naming
its location (file:line or key), exit code 2, no traceback, and writes nothing."""
from __future__ import annotations

import pytest

from finetune.cli import main

# (case id, recipe text with {data} {cascade} {out} placeholders, text the error must contain)
GOOD = """name: corpus
output_dir: {out}
cascade: {{path: {cascade}, stages: [I]}}
lora: {{rank: 4, alpha: 4}}
optim: {{batch_size: 4}}
phases:
  - {{name: general, data: {{path: {data}}}, steps: 2}}
"""


def _swap(old: str, new: str):
    """A case made by replacing text in the good recipe once its placeholders are filled."""
    def make(**where) -> str:
        text, before = GOOD.format(**where), old.format(**where)
        assert before in text, before
        return text.replace(before, new.format(**where))
    return make


CASES = [
    ("yaml-syntax", _swap("stages: [I]}}", "stages: [I}}"), ":3:"),
    ("yaml-tab-indent", GOOD + "lora:\n\trank: 4\n", ":9:"),
    ("not-a-mapping", "- just\n- a list\n", "a mapping"),
    ("empty-file", "", "empty"),
    ("python-tag", GOOD + "seed: !!python/object/apply:os.system ['echo pwned']\n", ":8:"),
    ("duplicate-key", GOOD + "name: twice\n", "name"),
    ("unknown-top-key", GOOD + "phase: []\n", "phase: unknown key; did you mean 'phases'"),
    ("unknown-nested-key", _swap("rank: 4,", "rnak: 4,"), "lora.rnak: unknown key; did you mean 'rank'"),
    ("rank-not-int", _swap("rank: 4,", "rank: four,"), "lora.rank"),
    ("rank-zero", _swap("rank: 4,", "rank: 0,"), "lora.rank"),
    ("alpha-negative", _swap("alpha: 4", "alpha: -1"), "lora.alpha"),
    ("lr-end-above-start", _swap("batch_size: 4}}", "batch_size: 4, lr: {{start: 1.0e-5, end: 1.0e-4}}}}"),
     "optim.lr.end: lr.end"),
    ("lr-start-zero", _swap("batch_size: 4}}", "batch_size: 4, lr: {{start: 0}}}}"), "optim.lr.start"),
    ("decay-every-zero", _swap("batch_size: 4}}", "batch_size: 4, lr: {{decay_every: 0}}}}"), "optim.lr.decay_every"),
    ("batch-negative", _swap("batch_size: 4}}", "batch_size: -4}}"), "optim.batch_size"),
    ("accum-not-dividing", _swap("batch_size: 4}}", "batch_size: 6, grad_accum: 4}}"), "not divisible"),
    ("wrong-stage-name", _swap("stages: [I]", "stages: [I, IV]"), "cascade.stages.1"),
    ("stage-twice", _swap("stages: [I]", "stages: [I, I]"), "listed twice"),
    ("stage-not-in-cascade", _swap("stages: [I]", "stages: [III]"), "stage III is not in the cascade"),
    ("no-phases", lambda **w: GOOD.format(**w).split("phases:")[0] + "phases: []\n", "phases"),
    ("phase-without-data", _swap("data: {{path: {data}}}, ", ""), "phases.0.data"),
    ("phase-without-steps", _swap(", steps: 2}}", "}}"), "phases.0.steps"),
    ("steps-zero", _swap("steps: 2}}", "steps: 0}}"), "phases.0.steps"),
    ("steps-for-unknown-stage", _swap("steps: 2}}", "steps: {{I: 2, IV: 3}}}}"), "unknown stage"),
    ("missing-data-folder", _swap("path: {data}", "path: {data}/nope"), "phases.0.data.path"),
    ("duplicate-phase", GOOD + "  - {{name: general, data: {{path: {data}}}, steps: 2}}\n", "used twice"),
    ("impossible-lora-target", _swap("alpha: 4}}", "alpha: 4, target_modules: [to_qq]}}"), "to_qq match no module"),
    ("frozen-fraction-above-one", _swap("alpha: 4}}", "alpha: 4, min_frozen_fraction: 1.5}}"), "lora.min_frozen_fraction"),
    ("caption-dropout-above-one", GOOD + "train: {{caption_dropout: 2}}\n", "train.caption_dropout"),
    ("mixed-precision-unknown", GOOD + "train: {{mixed_precision: fp8}}\n", "train.mixed_precision"),
    ("noise-aug-inverted", GOOD + "train: {{stage_II: {{noise_aug_min: 500, noise_aug_max: 100}}}}\n", "noise_aug_min"),
    ("ema-export-without-decay", GOOD + "train: {{ema: {{export: ema}}}}\n", "train.ema.export"),
    ("method-unknown", GOOD + "method: dreambooth\n", "method"),
    ("unset-env-var", _swap("name: corpus", "name: ${{CORPUS_UNSET_VARIABLE}}"), "CORPUS_UNSET_VARIABLE"),
    ("cascade-is-a-file", _swap("path: {cascade},", "path: {data}/metadata.jsonl,"), "cascade.path"),
    ("unknown-builtin", _swap("path: {cascade},", "path: builtin:huge,"), "unknown builtin cascade"),
    ("unknown-synth-split", _swap("path: {data}", "path: 'synth:nope?n=4'"), "unknown synth split"),
    ("unknown-synth-background", _swap("path: {data}", "path: 'synth:general?background=moon'"), "unknown synth background 'moon'"),
    ("missing-eval-prompts", GOOD + "eval: {{prompt_sets: {{held: {out}/none.txt}}}}\n", "eval.prompt_sets.held"),
    ("distill-unknown-phase", GOOD + "distill: {{steps: 2, data: [domian]}}\n", "distill.data.0: no phase named 'domian'"),
    ("distill-too-many-levels", GOOD + "distill: {{steps: 2, student: {{drop_levels: 2}}}}\n", "distill.student.drop_levels"),
    ("distill-nothing-trains", GOOD + "distill: {{steps: 2, weights: {{task: 0, output: 0, feature: 0}}}}\n", "distill.weights"),
    ("distill-channel-scale-zero", GOOD + "distill: {{steps: 2, student: {{channel_scale: 0}}}}\n", "distill.student.channel_scale"),
    ("replay-in-first-phase", _swap("steps: 2}}", "steps: 2, replay: {{fraction: 0.2}}}}"), "phases.0.replay: the first phase has no earlier phase"),
    ("replay-of-a-later-phase", GOOD + "  - {{name: domain, data: {{path: {data}}}, steps: 2, replay: {{fraction: 0.2, phases: [domain]}}}}\n",
     "phases.1.replay.phases.0: 'domain' is not an earlier phase (earlier: general)"),
    ("replay-everything", GOOD + "  - {{name: domain, data: {{path: {data}}}, steps: 2, replay: {{fraction: 1.0}}}}\n", "phases.1.replay.fraction"),
    ("bad-on-bad-sample", _swap("path: {data}}}", "path: {data}, on_bad_sample: ignore}}"), "phases.0.data.on_bad_sample"),
]


@pytest.mark.parametrize("case,text,expected", CASES, ids=[c[0] for c in CASES])
def test_malformed_recipe(case, text, expected, tmp_path, tiny_cascade, synth_general, capsys, monkeypatch):
    monkeypatch.delenv("CORPUS_UNSET_VARIABLE", raising=False)
    out = tmp_path / "out"
    path = tmp_path / f"{case}.yaml"
    where = dict(data=synth_general, cascade=tiny_cascade, out=out)
    path.write_text(text(**where) if callable(text) else text.format(**where))
    code = main(["run", str(path)])
    captured = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in captured.err
    lines = captured.err.strip().splitlines()
    assert lines and all(line.startswith("error: ") for line in lines), captured.err
    assert any(expected in line for line in lines), captured.err
    assert any(str(path) in line or "--set" in line for line in lines), "the error names the file"
    assert not out.exists(), "a rejected recipe writes nothing"


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


# Malformed datasets: the run stops before training with the reason, naming the folder.
def _bad_datasets(root):
    from PIL import Image

    empty = root / "empty"
    empty.mkdir()
    only_bad = root / "only-bad"
    only_bad.mkdir()
    (only_bad / "a.png").write_bytes(b"")
    (only_bad / "a.txt").write_text("a zero-byte image")
    (only_bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (only_bad / "b.txt").write_text("a truncated image")
    no_captions = root / "no-captions"
    no_captions.mkdir()
    Image.new("RGB", (64, 64)).save(no_captions / "c.png")
    bad_meta = root / "bad-metadata"
    bad_meta.mkdir()
    Image.new("RGB", (64, 64)).save(bad_meta / "d.png")
    (bad_meta / "metadata.jsonl").write_text('{"file_name": "../../etc/passwd", "text": "x"}\nnot json\n')
    return {"empty": empty, "only-bad": only_bad, "no-captions": no_captions, "bad-metadata": bad_meta}


@pytest.mark.parametrize("name", ["empty", "only-bad", "no-captions", "bad-metadata"])
def test_malformed_dataset_fails_before_training(name, tmp_path, tiny_cascade, capsys):
    folder = _bad_datasets(tmp_path)[name]
    path = tmp_path / "r.yaml"
    path.write_text(GOOD.format(data=folder, cascade=tiny_cascade, out=tmp_path / "out")
                    + f"cache_dir: {tmp_path / 'cache'}\n")
    code = main(["run", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert str(folder) in err or "phases.0.data" in err, err
    assert not (tmp_path / "out" / "checkpoints").exists()
