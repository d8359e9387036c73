r"""Kill a run with SIGKILL at chosen points, rerun the same command, and compare every
stage's results with an uninterrupted run (ProDA's and RobustNet's acceptance checks).

  python benchmarks/kill_resume.py --config=configs/proda.py:synthetic --workdir=/tmp/kr \
      --kill_at=stage1/checkpoints/200 --kill_at=hard_labels1/chunks/batch_0000001.npz
  python benchmarks/kill_resume.py --config=configs/robustnet.py:synthetic \
      --workdir=/tmp/kr_isw --kill_at=checkpoints/100 --kill_at=checkpoints/400

Runs `python -m launch.main` three ways under WORKDIR: 'straight' (uninterrupted), then
'killed': started, SIGKILLed as soon as the first --kill_at path exists, restarted, killed
again at the next one, ..., and finally run to the end. Prints each stage's final mIoU (or an
offline pass's summary) side by side and whether every results.json / manifest summary is
identical (the 'seconds' field aside); exits 1 if not.
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import time


def _command(config: str, workdir: str, extra: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "launch.main",
        f"--config={config}",
        f"--workdir={workdir}",
        *extra,
    ]


def _kill_when(command, path: str, log) -> None:
    process = subprocess.Popen(command, stdout=log, stderr=log)
    while not os.path.exists(path):
        if process.poll() is not None:
            raise SystemExit(f"The run finished (rc {process.returncode}) before {path} appeared")
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    print(f"killed with SIGKILL once {path} existed", flush=True)


def _outcomes(workdir: str) -> dict:
    """{stage: results.json 'final' without 'seconds', or an offline pass's summary}; a
    single-stage run's results.json is stage 'run'."""
    found = {}
    if os.path.exists(os.path.join(workdir, "results.json")):
        with open(os.path.join(workdir, "results.json")) as f:
            found["run"] = json.load(f)["final"]
        found["run"].pop("seconds", None)
    for name in sorted(os.listdir(workdir)):
        results = os.path.join(workdir, name, "results.json")
        manifest = os.path.join(workdir, name, "manifest.json")
        if os.path.exists(results):
            with open(results) as f:
                final = json.load(f)["final"]
            final.pop("seconds", None)
            found[name] = final
        elif os.path.exists(manifest):
            with open(manifest) as f:
                found[name] = json.load(f).get("summary", {})
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--kill_at", action="append", default=[], help="Path under the run.")
    parser.add_argument("--flag", action="append", default=[], help="Extra launch.main flag.")
    args = parser.parse_args()
    straight, killed = (os.path.join(args.workdir, n) for n in ("straight", "killed"))
    os.makedirs(args.workdir, exist_ok=True)
    with open(os.path.join(args.workdir, "log.txt"), "a") as log:
        start = time.time()
        subprocess.run(
            _command(args.config, straight, args.flag), stdout=log, stderr=log, check=True
        )
        print(f"uninterrupted run: {time.time() - start:.0f} s", flush=True)
        start = time.time()
        for path in args.kill_at:
            _kill_when(_command(args.config, killed, args.flag), os.path.join(killed, path), log)
        subprocess.run(_command(args.config, killed, args.flag), stdout=log, stderr=log, check=True)
        print(f"killed and rerun: {time.time() - start:.0f} s in all", flush=True)
    a, b = _outcomes(straight), _outcomes(killed)
    print(f"{'stage':<14} {'uninterrupted':>16} {'killed + rerun':>16}  identical")
    for name in sorted(set(a) | set(b)):

        def show(x):
            return f"{x['miou']:.4f}" if x and "miou" in x else json.dumps(x)[:16]

        same = a.get(name) == b.get(name)
        print(f"{name:<14} {show(a.get(name)):>16} {show(b.get(name)):>16}  {same}")
    same = a == b
    print("all results identical:", same)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
