"""MANN's own measure on test sequences: accuracy at the 1st, 2nd, 3rd, 4th, 5th and 10th presentation of
a class (Santoro et al. 2016, Table 1), with a 95 % interval over sequences, beside the paper's figures.

    FEWSHOT_DATA=/path/to/data python scripts/mann_instances.py outputs/.../checkpoints/best.pt
    python scripts/mann_instances.py CKPT --n-sequences 1000 --per-class 10 --split test --json out.json

The sequences come from MANN's own batch source over the split (``n_way`` of the checkpoint's training
shape, ``--per-class`` instances of each class, shuffled; labels a fresh permutation per sequence), seeded
by ``--seed`` (default: the checkpoint's eval.seed + 1, as the test), so a seed gives the same sequences.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fewshot_runner.errors import UserError

#: Santoro et al. 2016, Table 1 (Omniglot, 5 classes per episode, one-hot labels, test set), accuracy %.
PAPER_MANN = {1: 36.4, 2: 82.8, 3: 91.0, 4: 92.6, 5: 94.9, 10: 98.1}


def instance_table(checkpoint: str, n_sequences: int, per_class: int | None, split_name: str, seed: int | None,
                   device: str | None) -> dict:
    from fewshot_runner.algorithms.mann import MANN
    from fewshot_runner.engine import checkpoint as ckpt
    from fewshot_runner.engine.build import build_dataset, build_learner, build_transforms, episode_shapes, run_runtime
    from fewshot_runner.engine.ema import eval_weights
    from fewshot_runner.engine.evaluate import mean_ci95

    state = ckpt.load_checkpoint(checkpoint)
    saved = OmegaConf.create(state["config"])
    if device is not None:
        OmegaConf.update(saved, "device.type", device)
    dataset = build_dataset(saved.data)
    tr, _ = episode_shapes(saved.data)
    per_class = per_class or tr.n_shot + tr.n_query
    if per_class < 2:
        raise UserError(f"--per-class {per_class} must be >= 2 (one instance per class has no second presentation)")
    runtime = run_runtime(saved.device)
    algo = build_learner(saved, dataset.x_shape, tr.n_way, runtime)
    if not isinstance(algo, MANN):
        raise UserError(f"{checkpoint} holds a {type(algo).__name__}, not a MANN (algo=mann); this table is MANN's")
    algo.load_state_dict(eval_weights(state))
    algo.eval()
    _, transform = build_transforms(saved.data, channels=dataset.x_shape[0])
    split = dataset.split(split_name)
    seed = saved.eval.seed + 1 if seed is None else seed
    with torch.no_grad():
        measures = algo.test_measures(split, tr.n_way, per_class, n_sequences, seed, runtime, transform)
    rows = {}
    for name, accs in measures.items():
        k = int(name.removeprefix("acc_inst"))
        mean, ci = mean_ci95(accs)
        rows[k] = {"acc": mean, "ci95": ci, "paper": PAPER_MANN.get(k)}
    return {"checkpoint": str(checkpoint), "step": int(state["step"]), "split": split_name, "n_way": tr.n_way,
            "per_class": per_class, "n_sequences": n_sequences, "seed": seed, "instances": rows}


def print_table(result: dict) -> None:
    print(f"MANN per-instance accuracy: {result['checkpoint']} (step {result['step']}), {result['split']} split, "
          f"{result['n_sequences']} sequences of {result['n_way']} classes x {result['per_class']} instances, "
          f"seed {result['seed']}")
    print(f"{'instance':>8}  {'accuracy':>17}  {'paper (Table 1)':>15}")
    for k, row in sorted(result["instances"].items()):
        paper = f"{row['paper']:.1f} %" if row["paper"] is not None else "-"
        print(f"{k:>8}  {100 * row['acc']:>8.2f} % ± {100 * row['ci95']:.2f}  {paper:>15}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="a MANN checkpoint (best.pt or last.pt of `fewshot train algo=mann`)")
    p.add_argument("--n-sequences", type=int, default=1000, help="test sequences (default 1000)")
    p.add_argument("--per-class", type=int, default=None,
                   help="instances per class in a sequence (default: the training shape's n_shot + n_query)")
    p.add_argument("--split", default="test", help="which split's classes (default test)")
    p.add_argument("--seed", type=int, default=None, help="sequence seed (default: the checkpoint's eval.seed + 1)")
    p.add_argument("--device", default=None, help="cpu or cuda (default: the checkpoint's device.type)")
    p.add_argument("--json", default=None, help="also write the table to this JSON file")
    args = p.parse_args(argv)
    try:
        if args.n_sequences < 2:
            raise UserError(f"--n-sequences {args.n_sequences} must be >= 2 (a 95 % interval needs two)")
        result = instance_table(args.checkpoint, args.n_sequences, args.per_class, args.split, args.seed, args.device)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
