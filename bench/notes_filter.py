"""Benchmark: the whole notes stage against the package at --baseline-ref, on synthetic NOTEEVENTS.

Both packages run `run_notes_stage` (default policies; as many notes held out as 2023's 517 of
MIMIC's 3.9 GB, scaled to the file) on the same synthetic file (`python -m support.synthetic_notes
--gb X`: the real category mix, 1.95 kB a row), each run a process of its own, its input just read
into the page cache; the two alternate, `--repeat` times, and the medians count. Wall time includes
imports and exit; CPU time (user + system) and peak RSS come from wait4. Every output file of the
two must be byte-identical (SHA-256). A file of a quarter of the size shows whether memory grows
with the input; `--gzip` adds that file gzipped. The baseline package comes from `git archive`; a
warm-up run of each package (not counted) compiles the baseline's scanner.

    python bench/notes_filter.py              # 2.2 and 0.55 GB, 3 runs each (about 5 minutes)
    python bench/notes_filter.py --gb 4 --repeat 1 --gzip

Prints the BENCHMARKS.md table; last line: `RESULT wall_s=<ours> baseline_wall_s=<...>
peak_rss_mb=<ours> baseline_peak_rss_mb=<...> identical=<True|False>` (the big file).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASELINE_REF = "a932045"  # main before the notes stage read with pyarrow: the C scanner
READ_CHUNK = 16 << 20


def run_stage(noteevents: str, out: str) -> None:
    """The child: the stage of the package first on PYTHONPATH."""
    from asclepius_r.config import resolve
    from asclepius_r.notes.stage import NotePolicy, SplitPolicy, run_notes_stage

    # The schema's defaults (a config that sets nothing), in the baseline's package as in ours.
    config = resolve({"noteevents": None, "models": {"none": {"base": None}}}, require_data=False)

    out = Path(out)
    heldout = max(1, round(517 * Path(noteevents).stat().st_size / 3.9e9))
    names = ("discharge.parquet", "heldout.parquet", "heldout_row_ids.txt", "stats.json")
    run_notes_stage(
        noteevents,
        *(out / name for name in names),
        NotePolicy.from_config(config["notes"]),
        SplitPolicy(heldout, config["seed"]),
    )


def measure(package: Path, noteevents: Path, work: Path) -> dict:
    """One run in a child process: wall s, CPU s, peak RSS MB, and every output file's SHA-256."""
    with open(noteevents, "rb") as raw:  # into the page cache
        while raw.read(READ_CHUNK):
            pass
    with tempfile.TemporaryDirectory(dir=work) as out, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", str(noteevents), out],
            env={**os.environ, "PYTHONPATH": str(package)},
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own usage, peak RSS included
        wall = time.perf_counter() - started
        if os.waitstatus_to_exitcode(status):
            stderr.seek(0)
            raise SystemExit(f"{package} on {noteevents} failed:\n{stderr.read().decode()[-3000:]}")
        hashes = {}
        for path in sorted(Path(out).rglob("*")):
            if path.is_file():
                with open(path, "rb") as data:
                    hashes[str(path.relative_to(out))] = hashlib.file_digest(data, "sha256").hexdigest()
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "rss": usage.ru_maxrss / 1024, "hashes": hashes}


def synthesize(path: Path, gb: float, gzipped: bool = False) -> Path:
    """A synthetic NOTEEVENTS.csv of about `gb` GB, made once and reused while it exists."""
    if not path.exists():
        command = [sys.executable, "-m", "support.synthetic_notes", str(path) + ".partial", "--gb", str(gb)]
        subprocess.run(command + (["--gzip"] if gzipped else []), check=True, cwd=REPO, stdout=subprocess.DEVNULL)
        Path(str(path) + ".partial").rename(path)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--gb", type=float, default=2.2, help="size of the main file (default 2.2)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each package on the main file")
    parser.add_argument("--gzip", action="store_true", help="also the small file gzipped (as PhysioNet ships it)")
    parser.add_argument("--baseline-ref", default=BASELINE_REF)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/out/notes_filter")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files for the next run")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_stage(*args.child)
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = {
        f"{args.gb} GB": synthesize(args.workdir / f"NOTEEVENTS-{args.gb}GB.csv", args.gb),
        f"{args.gb / 4} GB": synthesize(args.workdir / f"NOTEEVENTS-{args.gb / 4}GB.csv", args.gb / 4),
    }
    if args.gzip:
        files[f"{args.gb / 4} GB, gzip"] = synthesize(
            args.workdir / f"NOTEEVENTS-{args.gb / 4}GB.csv.gz", args.gb / 4, True
        )
    try:
        with tempfile.TemporaryDirectory(dir=args.workdir) as work:
            work = Path(work)
            baseline = work / "baseline"
            baseline.mkdir()
            archive = subprocess.run(
                ["git", "-C", str(REPO), "archive", args.baseline_ref, "asclepius_r"], check=True, capture_output=True
            )
            subprocess.run(["tar", "-x", "-C", str(baseline)], input=archive.stdout, check=True)
            packages = {"this checkout": REPO, f"baseline {args.baseline_ref}": baseline}
            small = files[f"{args.gb / 4} GB"]
            for package in packages.values():  # warm-up: builds the baseline's scanner
                measure(package, small, work)
            runs = {(name, label): [] for label in files for name in packages}
            for label, path in files.items():
                for _ in range(args.repeat if label == f"{args.gb} GB" else 1):  # in turns
                    for name, package in packages.items():
                        runs[name, label].append(measure(package, path, work))
    finally:
        if not args.keep:
            for path in files.values():
                path.unlink(missing_ok=True)
    print(f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} (1, 5, 15 min) on {os.cpu_count()} CPUs")
    print("| input | package | wall s, median (all runs) | CPU s | peak RSS MB | outputs |")
    print("|---|---|---|---|---|---|")
    medians = {key: sorted(each, key=lambda run: run["wall"])[len(each) // 2] for key, each in runs.items()}
    identical = {
        label: len({str(run["hashes"]) for (_, of), each in runs.items() if of == label for run in each}) == 1
        for label in files
    }
    for (name, label), each in runs.items():
        median, walls = medians[name, label], ", ".join(f"{run['wall']:.2f}" for run in each)
        print(
            f"| {label} | {name} | **{median['wall']:.2f}** ({walls}) | {median['cpu']:.1f} | {median['rss']:.0f} | "
            f"{'identical' if identical[label] else 'DIFFERENT'} |"
        )
    big = f"{args.gb} GB"
    ours, base = (medians[name, big] for name in packages)
    print(
        f"RESULT wall_s={ours['wall']:.2f} baseline_wall_s={base['wall']:.2f} peak_rss_mb={ours['rss']:.0f} "
        f"baseline_peak_rss_mb={base['rss']:.0f} identical={identical[big]}"
    )


if __name__ == "__main__":
    main()
