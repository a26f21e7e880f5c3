"""Training throughput, peak memory and time to first step: the kit against a plain diffusers +
peft LoRA loop (benchmarks/reference_lora.py), on the same model, data, batch, steps and seed;
then sampling latency of the cascade, teacher against a distilled student.

    python benchmarks/run_benchmark.py                 # prints the tables (about 8 minutes here)
    python benchmarks/run_benchmark.py --reps 5 --markdown docs/performance-latest.md
    python benchmarks/run_benchmark.py --compile       # also the kit with train.compile: true
                                                       # (adds minutes of compilation per run)
    python benchmarks/run_benchmark.py --bf16          # also the kit with train.mixed_precision: bf16
                                                       # (autocast; fast where the CPU has native bf16)

Every training measurement is a fresh process (peak RSS is the process's VmHWM, or
torch.cuda.max_memory_allocated on a GPU), the configurations are interleaved in a rotating
order, and the table shows the median of the repetitions. Images/s counts the steps after
the first `--warmup` ones; time to first step runs from process start (imports, model load,
data preparation and text encoding on an empty cache included) to the end of step 1.
"""
from __future__ import annotations

import time

T0 = time.perf_counter()  # before the heavy imports: time to first step counts them

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

STUDENT = dict(mid_block=False, drop_levels=1, channel_scale=0.75)  # recipes/distill-tiny.yaml


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def summarise(times: list[float], batch: int, warmup: int) -> dict:
    steady = times[warmup:]
    span = steady[-1] - times[warmup - 1]
    return {"first_step_s": times[0] - T0, "images_per_s": batch * len(steady) / span,
            "peak_mb": peak_memory_mb()}


# ----------------------------------------------------------------------------- children
def child_reference(args) -> dict:
    from reference_lora import train_reference

    from finetune.cascade import Cascade

    cascade = Cascade.from_spec(args.cascade)
    low = cascade.resolution("I") if args.stage != "I" else None
    times = train_reference(cascade.stage_dirs[args.stage], cascade._text_dir(), Path(args.data),
                            args.batch, args.steps, args.rank, low_size=low)
    return summarise(times, args.batch, args.warmup)


def kit_recipe(args, work: Path) -> str:
    """The recipe the kit's child trains: one phase of `args.steps` steps on one stage, with
    `args.kit_train` (", key: value, ...") appended to its train section."""
    contrastive = f"losses: {{contrastive: {{kind: {args.contrastive}}}}}\n" if args.contrastive != "off" else ""
    return f"""name: bench
seed: 0
output_dir: {work / 'run'}
cache_dir: {work / 'cache'}
cascade: {{path: {args.cascade}, stages: [{args.stage}]}}
lora: {{rank: {args.rank}, alpha: {args.rank}}}
optim: {{batch_size: {args.batch}}}
train: {{checkpoint_every: 100000, log_every: 100000, device: auto{args.kit_train}}}
{contrastive}phases:
  - {{name: domain, data: {{path: {args.data}}}, steps: {args.steps}}}
"""


def child_kit(args) -> dict:
    from finetune.recipe import load_recipe
    from finetune.train import Trainer, run_recipe

    times: list[float] = []
    step = Trainer.step

    def timed(self, *a, **k):
        out = step(self, *a, **k)
        times.append(time.perf_counter())
        return out

    Trainer.step = timed
    work = Path(tempfile.mkdtemp(prefix="bench-kit-"))
    recipe = work / "bench.yaml"
    recipe.write_text(kit_recipe(args, work))
    run_recipe(load_recipe(recipe))
    return summarise(times, args.batch, args.warmup)


def child_sampling(args) -> dict:
    """Seconds to sample a batch: teacher and student, stage I alone and the whole cascade."""
    import torch

    from finetune.cascade import Cascade
    from finetune.distill import build_student
    from finetune.recipe.schema import StudentSpec
    from finetune.sampling import CascadeSampler, CascadeVariant, SampleSettings

    cascade = Cascade.from_spec(args.cascade)
    work = Path(tempfile.mkdtemp(prefix="bench-student-"))
    unets = {}
    for stage in ("I", "II"):
        student, _ = build_student(cascade.load_unet(stage), StudentSpec(**STUDENT))
        student.save_pretrained(work / stage)
        unets[stage] = work / stage
    prompts = ["two red circles at the top"] * args.batch
    settings = SampleSettings(steps=args.sample_steps, steps_II=args.sample_steps_II, batch_size=args.batch)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    result = {}
    for name, variant in [("teacher", CascadeVariant("teacher")), ("student", CascadeVariant("student", unets=unets))]:
        for stages in (["I"], ["I", "II"]):
            sampler = CascadeSampler(cascade, variant, stages=stages, device=device)
            sampler.generate(prompts[:2], SampleSettings(steps=2, steps_II=2))  # warm-up
            started = time.perf_counter()
            sampler.generate(prompts, settings)
            result[f"{name}_{'+'.join(stages)}"] = time.perf_counter() - started
    return result


# ----------------------------------------------------------------------------- parent
def benchmark_configs(compile: bool = False, bf16: bool = False) -> list[tuple[str, dict]]:
    """(loop, settings) of every row, in table order within a stage. Stage II's kit also fits
    IF's learned variance (the reference fits epsilon only): its "variance: ignore" row is
    the like-for-like loss."""
    configs = [("kit", dict(stage="I")), ("reference", dict(stage="I")),
               ("kit", dict(stage="I", contrastive="feature_infonce")),
               ("kit", dict(stage="II")), ("reference", dict(stage="II")),
               ("kit", dict(stage="II", contrastive="feature_infonce")),
               ("kit", dict(stage="II", train="variance: ignore"))]
    extra_train = (["compile: true"] if compile else []) + (["mixed_precision: bf16"] if bf16 else [])
    if compile and bf16:
        extra_train.append("compile: true, mixed_precision: bf16")
    return configs + [("kit", dict(stage=stage, train=train)) for train in extra_train for stage in ("I", "II")]


def paired_ratios(rows: list[dict], against: list[dict], key: str = "images_per_s") -> list[float]:
    """rows[r][key] / against[r][key] for every repetition r. Both were measured in the same
    repetition, close in time, so the machine's drift between repetitions (which moves a
    configuration's throughput by 15% or more here) cancels in each ratio."""
    return [row[key] / base[key] for row, base in zip(rows, against, strict=True)]


def spread(values: list[float], fmt: str, unit: str = "") -> str:
    """The median, and the range over the repetitions when there are several."""
    text = format(statistics.median(values), fmt) + unit
    if len(values) > 1:
        text += f" ({format(min(values), fmt)} to {format(max(values), fmt)})"
    return text


def training_table(configs: list[tuple[str, dict]], results: dict[int, list[dict]]) -> list[str]:
    """The training rows in markdown: medians over the repetitions, and every ratio taken per
    repetition (paired) with its median and range."""
    def med(i, key):
        return statistics.median(r[key] for r in results[i])

    lines = ["| stage | loop | images/s | peak memory (MB) | time to first step (s) | images/s vs reference |",
             "|---|---|---|---|---|---|"]
    for stage in ("I", "II"):
        ref = next(i for i, (k, e) in enumerate(configs) if k == "reference" and e["stage"] == stage)
        for i, (kind, extra) in enumerate(configs):
            if extra["stage"] != stage:
                continue
            name = kind + (f" + {extra['contrastive']}" if "contrastive" in extra else "") + (
                f" ({extra['train']})" if "train" in extra else "")
            lines.append(f"| {stage} | {name} | {med(i, 'images_per_s'):.1f} | {med(i, 'peak_mb'):.0f} | "
                         f"{med(i, 'first_step_s'):.1f} | {spread(paired_ratios(results[i], results[ref]), '.2f', 'x')} |")
        kit = next(i for i, (k, e) in enumerate(configs) if k == "kit" and e == {"stage": stage})
        con = next(i for i, (k, e) in enumerate(configs) if "contrastive" in e and e["stage"] == stage)
        # the step-time cost: time with the term over time without, minus one
        cost = [1 / ratio - 1 for ratio in paired_ratios(results[con], results[kit])]
        lines.append(f"| {stage} | contrastive cost | | | | {spread(cost, '+.0%')} of kit step time |")
    return lines


def run_child(kind: str, args, **extra) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, "--cascade", args.cascade,
           "--data", str(args.data), "--batch", str(extra.get("batch", args.batch)),
           "--steps", str(extra.get("steps", args.steps)), "--warmup", str(args.warmup),
           "--rank", str(args.rank), "--sample-steps", str(args.sample_steps),
           "--sample-steps-II", str(args.sample_steps_II)]
    for key in ("stage", "contrastive"):
        if key in extra:
            cmd += [f"--{key}", extra[key]]
    if "train" in extra:
        cmd += ["--kit-train", f", {extra['train']}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        raise SystemExit(f"benchmark child {kind} {extra} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cascade", default="builtin:tiny")
    parser.add_argument("--data", help="imagefolder to train on (default: 256 synthetic domain images)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--sample-steps-II", type=int, default=10)
    parser.add_argument("--markdown", help="also write the tables to this file")
    parser.add_argument("--compile", action="store_true",
                        help="also measure the kit with train.compile: true (torch.compile)")
    parser.add_argument("--bf16", action="store_true",
                        help="also measure the kit with train.mixed_precision: bf16 (with --compile: both)")
    parser.add_argument("--child", choices=["kit", "reference", "sampling"], help=argparse.SUPPRESS)
    parser.add_argument("--stage", default="I", help=argparse.SUPPRESS)
    parser.add_argument("--contrastive", default="off", help=argparse.SUPPRESS)
    parser.add_argument("--kit-train", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child:
        child = {"kit": child_kit, "reference": child_reference, "sampling": child_sampling}[args.child]
        print(json.dumps(child(args)))
        return 0

    if args.data is None:
        from data_tools.synth import write_split

        args.data = write_split(Path(tempfile.mkdtemp(prefix="bench-data-")) / "domain", "domain",
                                n=256, size=64, seed=2)
    configs = benchmark_configs(args.compile, args.bf16)
    results: dict[int, list[dict]] = {i: [] for i in range(len(configs))}
    started = time.time()
    for rep in range(args.reps):
        order = list(range(len(configs)))
        order = order[rep % len(order):] + order[:rep % len(order)]  # rotate: no config always first
        for i in order:
            kind, extra = configs[i]
            results[i].append(run_child(kind, args, **extra))
            print(f"rep {rep + 1}/{args.reps} {kind} {extra}: {results[i][-1]}", file=sys.stderr)
    sampling = [run_child("sampling", args) for _ in range(args.reps)]

    lines = [f"Training, LoRA rank {args.rank}, batch {args.batch}, {args.steps} steps "
             f"({args.warmup} warm-up), median of {args.reps}; cascade {args.cascade}", ""]
    lines += training_table(configs, results)
    lines += ["", f"Sampling {args.batch} images ({args.sample_steps} stage I steps, {args.sample_steps_II} "
              f"stage II steps), seconds, median of {args.reps}; student cuts {STUDENT}", "",
              "| part | teacher (s) | student (s) | speed-up |", "|---|---|---|---|"]
    for part, key in [("stage I", "I"), ("stage II", None), ("whole cascade", "I+II")]:
        def value(who):
            if key is None:
                return statistics.median(s[f"{who}_I+II"] - s[f"{who}_I"] for s in sampling)
            return statistics.median(s[f"{who}_{key}"] for s in sampling)
        lines.append(f"| {part} | {value('teacher'):.2f} | {value('student'):.2f} | "
                     f"{value('teacher') / value('student'):.2f}x |")
    lines.append(f"\n(benchmark wall time {time.time() - started:.0f} s)")
    table = "\n".join(lines)
    print(table)
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
