"""Where a kit training step spends its time: torch.profiler over steady-state steps of a LoRA
run on builtin:tiny, the top operators by self CPU time, and the share of the step spent
outside the UNet's forward/backward (the kit's own per-step overhead).

    python benchmarks/profile_step.py --stage I --steps 12
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="I")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--contrastive", default="off")
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()

    import torch
    from torch.profiler import ProfilerActivity, profile, record_function

    from data_tools.synth import write_split
    from finetune.recipe import load_recipe
    from finetune.train import Trainer, run_recipe

    work = Path(tempfile.mkdtemp(prefix="profile-"))
    data = write_split(work / "data", "domain", n=256, size=64, seed=2)
    recipe = work / "r.yaml"
    recipe.write_text(f"""name: profile
output_dir: {work / 'run'}
cache_dir: {work / 'cache'}
cascade: {{path: builtin:tiny, stages: [{args.stage}]}}
lora: {{rank: 16, alpha: 16}}
optim: {{batch_size: {args.batch}}}
train: {{checkpoint_every: 100000, log_every: 100000}}
losses: {{contrastive: {{kind: {args.contrastive}}}}}
phases:
  - {{name: domain, data: {{path: {data}}}, steps: {args.steps}}}
""")
    step = Trainer.step
    seen = {"n": 0}
    prof = profile(activities=[ProfilerActivity.CPU], record_shapes=False)

    def profiled(self, *a, **k):
        seen["n"] += 1
        if seen["n"] == 3:  # warm steps first
            prof.__enter__()
        with record_function("kit.step"):
            out = step(self, *a, **k)
        if seen["n"] == args.steps:
            prof.__exit__(None, None, None)
        return out

    Trainer.step = profiled
    run_recipe(load_recipe(recipe))
    averages = prof.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    total = next(e.cpu_time_total for e in averages if e.key == "kit.step")
    backward = sum(e.self_cpu_time_total for e in averages if "Backward" in e.key or "backward" in e.key)
    print(f"kit.step total {total / 1e3:.0f} ms over {args.steps - 2} steps; "
          f"autograd backward ops (self) {backward / total:.0%}; threads {torch.get_num_threads()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
