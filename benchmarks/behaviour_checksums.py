"""Checksums of what difflab's commands produce, to prove a refactor changed no behaviour (bit for bit).

    python benchmarks/behaviour_checksums.py --out /tmp/check-before --json before.json
    ... change the code ...
    python benchmarks/behaviour_checksums.py --out /tmp/check-after --json after.json --compare before.json

Runs, on this machine, in a scratch folder:
  * the README's main job, ``difflab train`` (digits, seed 0, 2000 steps; about 4 minutes on 2 CPU cores);
  * ``difflab sample`` of that run with three samplers (DDIM-50, DPM-Solver++(2M) 15 Karras steps, DDPM-1000);
  * a short class-conditional run with classifier-free-guided sampling (label dropout, the null class);
  * a short v-prediction run on the cosine schedule;
  * a short ``difflab train-classifier`` run.
and prints the SHA-256 (first 16 hex digits) of every checkpoint file's tensors and every sample grid.
Tensor checksums hash the raw bytes of each tensor in name order, so they compare weights, not file layouts.
``--skip-main`` leaves out the 4-minute main job (and its samples) for a quick check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from pathlib import Path

from safetensors.torch import load_file


def tensor_digest(path: Path) -> str:
    tensors = load_file(path)
    h = hashlib.sha256()
    for name in sorted(tensors):
        h.update(name.encode())
        h.update(tensors[name].contiguous().view(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def difflab(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "difflab", *args, "--quiet"], check=True)
    return time.perf_counter() - started


def checkpoint_rows(run: Path, label: str, files=("model", "ema")) -> dict:
    newest = sorted((run / "checkpoints").glob("step_*"))[-1]
    return {f"{label} {newest.name} {f}": tensor_digest(newest / f"{f}.safetensors") for f in files}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="scratch folder for the runs (must not exist or be empty)")
    p.add_argument("--json", help="write the checksums here")
    p.add_argument("--compare", help="a JSON written by an earlier run: report what differs")
    p.add_argument("--skip-main", action="store_true", help="leave out the 4-minute main job and its samples")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows: dict[str, str] = {}
    seconds: dict[str, float] = {}

    if not args.skip_main:
        seconds["main job"] = difflab("train", "--out", str(out), "--name", "digits")
        rows.update(checkpoint_rows(out / "digits", "train (main job)"))
        for label, extra in [("ddim 50", ["--sampler", "ddim", "--steps", "50"]),
                             ("dpmpp_2m 15 karras", ["--sampler", "dpmpp_2m", "--steps", "15", "--spacing", "karras"]),
                             ("ddpm 1000", ["--sampler", "ddpm", "-n", "16"])]:
            gen = out / "generated" / label.replace(" ", "_")
            difflab("sample", str(out / "digits"), "--out", str(gen), *extra)
            rows[f"sample {label}"] = file_digest(next(gen.glob("*.png")))

    seconds["conditional"] = difflab("train", "--out", str(out), "--name", "cond", "--conditional", "--steps", "300",
                                     "--sample-every", "0", "--checkpoint-every", "300")
    rows.update(checkpoint_rows(out / "cond", "train --conditional 300"))
    gen = out / "generated" / "cond"
    difflab("sample", str(out / "cond"), "--out", str(gen), "--steps", "20", "-n", "4", "--guidance-scale", "2")
    rows["sample cond cfg 2"] = file_digest(next(gen.glob("*.png")))

    seconds["v cosine"] = difflab("train", "--out", str(out), "--name", "vpred", "--prediction", "v", "--schedule",
                                  "cosine", "--steps", "200", "--sample-every", "0", "--checkpoint-every", "200")
    rows.update(checkpoint_rows(out / "vpred", "train v cosine 200"))

    seconds["classifier"] = difflab("train-classifier", "--out", str(out), "--name", "clf", "--steps", "200",
                                    "--checkpoint-every", "200")
    rows.update(checkpoint_rows(out / "clf", "train-classifier 200", files=("model",)))
    accuracy = json.loads((out / "clf" / "accuracy.json").read_text())
    rows["train-classifier accuracy table"] = hashlib.sha256(json.dumps(accuracy["rows"]).encode()).hexdigest()[:16]

    old = json.loads(Path(args.compare).read_text())["checksums"] if args.compare else {}
    width = max(map(len, rows))
    print(f"{'what':<{width}}  {'sha256[:16]':<16}" + ("  same as before?" if old else ""))
    for key, value in rows.items():
        verdict = ("" if not old else "  yes" if old.get(key) == value else
                   f"  NO (was {old.get(key)})" if key in old else "  (new)")
        print(f"{key:<{width}}  {value:<16}{verdict}")
    print("seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in seconds.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"checksums": rows, "seconds": seconds}, indent=2))
    return 1 if old and any(old.get(k) != v for k, v in rows.items() if k in old) else 0


if __name__ == "__main__":
    raise SystemExit(main())
