r"""Runs methods on the built-in synthetic benchmark over several seeds; prints a Markdown table.

  python benchmarks/synthetic_benchmark.py --workdir=/tmp/jaxda_bench [--seeds=0,1,2]
      [--methods=source_only,adaptseg,oracle] [--extra=--config.total_steps=600]
  python benchmarks/synthetic_benchmark.py --workdir=/tmp/jaxda_bench \
      --methods=proda_warmup,proda_stage1,proda_stage2,proda_stage3   # ProDA's stages
  python benchmarks/synthetic_benchmark.py --workdir=/tmp/jaxda_bench \
      --methods=dasac_abn,dasac_sac                                    # DA-SAC's stages
  python benchmarks/synthetic_benchmark.py --workdir=/tmp/jaxda_bench \
      --methods=robustnet_base,robustnet_ibn,robustnet_isw             # RobustNet (DG)

Each (method, seed) trains in its own process with `python -m launch.main` into
`<workdir>/<method>/seed<seed>`; finished runs are reused, so an interrupted benchmark resumes.
The table reports the target mIoU of the *final* checkpoint (mean +- sample std over seeds),
never a selection on the validation split, and for each method on how many of the seeds it
beat source only trained with the same seed (paired), so that a mean gain is not read as a
gain on every run.
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

# Row name -> (title, `launch.main` flags). "{source_only}" stands for the source-only run of
# the same seed, which test-time adaptation starts from.
METHODS = {
    "source_only": ("Source only", ["--config=configs/source_only.py:synthetic"]),
    "adaptseg": ("AdaptSegNet (multi-level)", ["--config=configs/adaptseg.py:synthetic"]),
    # Ablation: AdaptSegNet's training with the adversarial weights at 0. Target batches still
    # pass through BatchNorm in training mode, so its running statistics mix both domains;
    # this row separates that effect from the adversarial one.
    "adaptseg_no_adv": (
        "AdaptSegNet with lambda_adv = 0 (ablation)",
        [
            "--config=configs/adaptseg.py:synthetic",
            "--config.adversarial.lambda_adv.main=0",
            "--config.adversarial.lambda_adv.aux=0",
        ],
    ),
    "minent": ("MinEnt", ["--config=configs/minent.py:synthetic"]),
    "advent": ("AdvEnt", ["--config=configs/advent.py:synthetic"]),
    "maxsquare": ("MaxSquare", ["--config=configs/maxsquare.py:synthetic"]),
    "maxsquare_iw": ("MaxSquare + IW", ["--config=configs/maxsquare.py:synthetic,iw"]),
    "maxsquare_iw_multi": (
        "MaxSquare + IW + multi-level guidance",
        ["--config=configs/maxsquare.py:synthetic,iw,multi"],
    ),
    "tent": (
        "TENT (online, from source only)",
        ["--config=configs/tent.py:synthetic", "--config.init_from={source_only}"],
    ),
    "bn_adapt": (
        "BN-adapt (TENT's norm, from source only)",
        ["--config=configs/tent.py:synthetic,norm", "--config.init_from={source_only}"],
    ),
    "dacs": (
        "DACS (DAFormer's re-implementation: EMA teacher, ClassMix, strong augmentation)",
        ["--config=configs/dacs.py:synthetic"],
    ),
    "oracle": ("Oracle (target labels)", ["--config=configs/oracle.py:synthetic"]),
    # DAFormer's network (a tiny MiT with its fusion head) and the methods built on it; paired
    # with source only on the same network; not in the default row set.
    "source_only_mit": (
        "Source only, MiT",
        ["--config=configs/source_only.py:synthetic,model=mit"],
    ),
    "dacs_mit": ("DACS, MiT", ["--config=configs/dacs.py:synthetic,model=mit"]),
    "daformer_mit": (
        "DAFormer (DACS + rare-class sampling + feature distance), MiT",
        ["--config=configs/daformer.py:synthetic"],
    ),
    "mic_mit": ("MIC(DAFormer), MiT", ["--config=configs/mic.py:synthetic"]),
    # The same methods on a small DeepLabV3+ (torchvision ResNet, RobustNet head); not in the
    # default row set.
    "source_only_v3plus": (
        "Source only, DeepLabV3+",
        ["--config=configs/source_only.py:synthetic,model=deeplabv3plus"],
    ),
    "adaptseg_v3plus": (
        "AdaptSegNet (multi-level), DeepLabV3+",
        ["--config=configs/adaptseg.py:synthetic,model=deeplabv3plus"],
    ),
}
# RobustNet's normalisation family (domain generalisation: the target is never seen in
# training); rows paired with its 'base' network; not in the default row set.
ROBUSTNET = ("base", "ibn", "iw", "irw", "isw")
for _norm in ROBUSTNET:
    METHODS[f"robustnet_{_norm}"] = (
        f"RobustNet {_norm.upper() if _norm != 'base' else 'baseline'}, DeepLabV3+ (DG)",
        [f"--config=configs/robustnet.py:synthetic,norm={_norm}"],
    )
# Multi-stage pipelines: one run per seed (`<workdir>/<pipeline>/seed<N>`), one row per
# training stage. ProDA's rows carry the agreement of the pseudo labels each stage produced
# (the offline pass after it) with the target labels: the warm-up's soft labels (argmax),
# the stage-1 and stage-2 hard labels; DA-SAC's SAC row the accuracy and coverage of its
# online pseudo labels, as logged during training.
PIPELINES = {
    "proda": "--config=configs/proda.py:synthetic",
    "dasac": "--config=configs/dasac.py:synthetic",
}
PRODA_STAGES = {
    "proda_warmup": ("ProDA warm-up (adversarial)", "warmup", "soft_labels"),
    "proda_stage1": ("ProDA stage 1 (prototypical denoising)", "stage1", "hard_labels1"),
    "proda_stage2": ("ProDA stage 2 (distillation, fresh student)", "stage2", "hard_labels2"),
    "proda_stage3": ("ProDA stage 3 (distillation)", "stage3", ""),
}
DASAC_STAGES = {
    "dasac_abn": ("DA-SAC ABN baseline (adaptive BN)", "abn", ""),
    "dasac_sac": ("DA-SAC SAC (momentum network, fused views)", "sac", ""),
}
STAGED = {
    **{m: ("proda", *row) for m, row in PRODA_STAGES.items()},
    **{m: ("dasac", *row) for m, row in DASAC_STAGES.items()},
}
for _name, (_pipeline, _title, _stage, _) in STAGED.items():
    METHODS[_name] = (_title, [PIPELINES[_pipeline]])
DEFAULT_METHODS = ",".join(
    m for m in METHODS if not m.endswith(("_v3plus", "_mit")) and not m.startswith("robustnet")
)


def run_one(method: str, seed: int, workdir: str, extra: list[str]) -> dict:
    pipeline, _, stage, _ = STAGED.get(method, (method, None, "", None))
    run_dir = os.path.join(workdir, pipeline, f"seed{seed}")
    results_file = os.path.join(run_dir, stage, "results.json")
    if not os.path.exists(results_file):
        flags = METHODS[method][1]
        if any("{source_only}" in flag for flag in flags):
            run_one("source_only", seed, workdir, extra)
        source_only = os.path.join(workdir, "source_only", f"seed{seed}")
        command = [
            sys.executable, "-m", "launch.main",
            *(flag.format(source_only=source_only) for flag in flags),
            f"--workdir={run_dir}", f"--config.seed={seed}", *extra,
        ]  # fmt: skip
        print("running:", " ".join(command), flush=True)
        start = time.time()
        log_path = os.path.join(workdir, f"{pipeline}_seed{seed}.log")
        os.makedirs(workdir, exist_ok=True)
        with open(log_path, "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        print(f"  done in {time.time() - start:.0f}s (log: {log_path})", flush=True)
    with open(results_file) as f:
        return json.load(f)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=DEFAULT_METHODS)
    parser.add_argument("--extra", action="append", default=[], help="extra launch.main flags")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; known: {sorted(METHODS)}")

    per_method = {
        method: np.array(
            [run_one(method, seed, args.workdir, args.extra)["final"]["miou"] for seed in seeds]
        )
        for method in methods
    }
    print(f"\nTarget mIoU (%) on the synthetic target_validation split, seeds {seeds}:\n")
    print("| method | mIoU mean ± std | per seed | beats source only (paired seeds) |")
    print("|---|---|---|---|")
    for method, mious in per_method.items():
        std = mious.std(ddof=1) if len(mious) > 1 else 0.0
        per_seed = ", ".join(f"{m:.2f}" for m in mious)
        # Paired with source only of the same network and seed (RobustNet: its baseline).
        suffix = next((s for s in ("_v3plus", "_mit") if method.endswith(s)), "")
        reference = "source_only" + suffix
        if method.startswith("robustnet"):
            reference = "robustnet_base"
        baseline = per_method.get(reference)
        wins = (
            ""
            if baseline is None or method == reference
            else f"{int(np.sum(mious > baseline))} of {len(seeds)}"
        )
        print(f"| {METHODS[method][0]} | {mious.mean():.1f} ± {std:.1f} | {per_seed} | {wins} |")
    proda = [m for m in methods if m in PRODA_STAGES]
    if proda:
        print_proda_table(proda, per_method, seeds, args.workdir)
    dasac = [m for m in methods if m in DASAC_STAGES]
    if dasac:
        print_dasac_table(dasac, per_method, seeds, args.workdir)
    robustnet = [m for m in methods if m.startswith("robustnet_")]
    if robustnet:
        print_robustnet_table(robustnet, seeds, args.workdir, args.extra)


def _print_header(header) -> None:
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))


def _stage_cells(mious, reference, seeds) -> tuple[str, str, str]:
    """(mean ± std, per seed, paired wins over `reference` or '') of one stage's mIoUs."""
    std = mious.std(ddof=1) if len(mious) > 1 else 0.0
    wins = "" if reference is None else f"{int(np.sum(mious > reference))} of {len(seeds)}"
    per_seed = ", ".join(f"{m:.2f}" for m in mious)
    return f"{mious.mean():.1f} ± {std:.1f}", per_seed, wins


def _pass_summary(workdir: str, seed: int, name: str) -> dict:
    path = os.path.join(workdir, "proda", f"seed{seed}", name, "manifest.json")
    with open(path) as f:
        return json.load(f).get("summary", {})


def print_proda_table(methods, per_method, seeds, workdir: str) -> None:
    """ProDA's stages side by side, each paired with the warm-up of its seed, with the
    pixel accuracy of the pseudo labels it produced (against the target training labels)."""
    print("\nProDA's stages (one pipeline per seed); pseudo labels produced by each stage vs the")
    print("target training labels: accuracy over all pixels; over pixels with confidence > 0.95")
    print("and the share of such pixels (the hard labels the next stage trains on):\n")
    header = ("stage", "mIoU mean ± std", "per seed", "beats its warm-up (paired)",
              "pseudo-label accuracy", "accuracy / coverage at 0.95")  # fmt: skip
    _print_header(header)
    warmup = per_method.get("proda_warmup")
    for method in methods:
        title, _, produced = PRODA_STAGES[method]
        reference = None if method == "proda_warmup" else warmup
        cells = _stage_cells(per_method[method], reference, seeds)
        accuracy = confident = ""
        if produced:
            summaries = [_pass_summary(workdir, seed, produced) for seed in seeds]
            acc = [100 * s["pseudo_label_accuracy"] for s in summaries]
            accuracy = f"{np.mean(acc):.1f} ± {np.std(acc, ddof=1) if len(acc) > 1 else 0:.1f}"
            if "coverage" in summaries[0]:
                conf = np.mean([100 * s["confident_accuracy"] for s in summaries])
                cover = np.mean([100 * s["coverage"] for s in summaries])
                confident = f"{conf:.1f} / {cover:.1f}"
        print(f"| {title} | {' | '.join(cells)} | {accuracy} | {confident} |")


def _logged(run_dir: str, tag: str, last: int) -> float:
    """Mean of the last `last` logged values of scalar `tag` in a run's TensorBoard events."""
    import tensorflow as tf

    values = []
    for name in sorted(os.listdir(run_dir)):
        if name.startswith("events.out.tfevents"):
            for event in tf.compat.v1.train.summary_iterator(os.path.join(run_dir, name)):
                for value in event.summary.value:
                    if value.tag == tag:
                        step_value = tf.make_ndarray(value.tensor) if value.HasField(
                            "tensor") else value.simple_value  # fmt: skip
                        values.append((event.step, float(step_value)))
    values.sort()
    return float(np.mean([v for _, v in values[-last:]])) if values else float("nan")


def print_dasac_table(methods, per_method, seeds, workdir: str) -> None:
    """DA-SAC's stages side by side, SAC paired with the ABN model of its seed, with the
    accuracy of SAC's pseudo labels against the target training labels and their coverage
    (share of target pixels above the threshold), averaged over its last 5 logged windows."""
    print("\nDA-SAC's stages (one pipeline per seed); SAC's online pseudo labels vs the target")
    print("training labels (accuracy, coverage), mean of the last 5 logged windows:\n")
    header = ("stage", "mIoU mean ± std", "per seed", "beats its ABN (paired)",
              "pseudo-label accuracy / coverage")  # fmt: skip
    _print_header(header)
    abn = per_method.get("dasac_abn")
    for method in methods:
        title, stage, _ = DASAC_STAGES[method]
        cells = _stage_cells(per_method[method], None if method == "dasac_abn" else abn, seeds)
        quality = ""
        if stage == "sac":
            runs = [os.path.join(workdir, "dasac", f"seed{seed}", stage) for seed in seeds]
            acc = np.mean([_logged(r, "train/pseudo_label_accuracy", 5) for r in runs])
            cover = np.mean([_logged(r, "train/pseudo_label_coverage", 5) for r in runs])
            quality = f"{100 * acc:.1f} / {100 * cover:.1f}"
        print(f"| {title} | {' | '.join(cells)} | {quality} |")


def _dg_results(method: str, seed: int, workdir: str, extra: list[str]) -> dict:
    """{dataset: mIoU} of `--mode=eval` on the run's config.eval.datasets (run once)."""
    run_dir = os.path.join(workdir, method, f"seed{seed}")
    found = [n for n in os.listdir(os.path.join(run_dir, "eval")) if n.startswith("datasets_")]
    if not found:
        command = [
            sys.executable, "-m", "launch.main", *METHODS[method][1], f"--workdir={run_dir}",
            f"--config.seed={seed}", "--mode=eval", *extra,
        ]  # fmt: skip
        with open(os.path.join(workdir, f"{method}_seed{seed}_eval.log"), "w") as log:
            subprocess.run(command, check=True, stdout=log, stderr=subprocess.STDOUT)
        found = [n for n in os.listdir(os.path.join(run_dir, "eval")) if n.startswith("datasets_")]
    with open(os.path.join(run_dir, "eval", sorted(found)[-1])) as f:
        record = json.load(f)
    return {name: r["miou"] for name, r in record["datasets"].items() if "miou" in r}


def print_robustnet_table(methods, seeds, workdir: str, extra: list[str]) -> None:
    """RobustNet's DG table: the unseen target domain and the source's own validation split
    (`--mode=eval` on config.eval.datasets), target wins paired with the baseline, and the
    share of off-diagonal covariance entries ISW's mask selected per whitened layer."""
    print("\nRobustNet (trained on the source only): DG table of --mode=eval, mIoU mean ± std;")
    print("ISW mask: share of each whitened layer's off-diagonal entries selected (stem /")
    print("layer1 / layer2):\n")
    _print_header(("network", "target (unseen)", "source validation",
                   "target beats baseline (paired)", "ISW mask share"))  # fmt: skip
    per = {m: [_dg_results(m, seed, workdir, extra) for seed in seeds] for m in methods}
    base = per.get("robustnet_base")
    for method, records in per.items():
        cells = []
        for name in ("target", "source"):
            values = np.array([r[name] for r in records])
            std = values.std(ddof=1) if len(values) > 1 else 0.0
            cells.append(f"{values.mean():.1f} ± {std:.1f}")
        wins = ""
        if base is not None and method != "robustnet_base":
            won = sum(r["target"] > b["target"] for r, b in zip(records, base, strict=True))
            wins = f"{won} of {len(seeds)}"
        share = ""
        if method == "robustnet_isw":
            runs = [os.path.join(workdir, method, f"seed{seed}") for seed in seeds]
            fractions = [
                np.mean([_logged(r, f"isw/sensitive_fraction/{slot}", 1) for r in runs])
                for slot in ("stem", "layer1", "layer2")
            ]
            share = " / ".join(f"{100 * f:.0f}%" for f in fractions)
        print(f"| {METHODS[method][0]} | {' | '.join(cells)} | {wins} | {share} |")


if __name__ == "__main__":
    main()
