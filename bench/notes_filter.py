"""Benchmark: the streaming notes stage against the naive pandas baseline, on synthetic NOTEEVENTS.

The baseline is what the 2023 script did: read the whole file with pandas, keep
`CATEGORY == 'Discharge summary'`, write the result (here Parquet, like ours). Each contender
runs in its own process, so that its wall time includes its imports and its peak RSS (from
wait4) is its own, as is its CPU time (user + system: the fairer figure when other work shares
the machine; the load average is printed too). Every run starts with its input just read into
the page cache (see warm). The ceiling is the raw read speed of the same file. Ours and pandas
run --repeat times on the main file, alternately; the median of each counts. Peak RSS is
measured at two input sizes to show whether memory grows with the input.

Our stage's scanner (asclepius_r/record_scanner.c) is compiled once per install (`make venv`);
the `build` run times that compilation alone, into a temporary folder, and the speedup of a first
run with it included is printed beside the steady-state one that the RESULT line gives.

    python bench/notes_filter.py             # 2.2 GB and 0.55 GB files, 3 runs each (several minutes)
    python bench/notes_filter.py --quick     # small files, under a minute
    python bench/notes_filter.py --gzip      # and both on the second file gzipped

The last line printed is
`RESULT speedup=<x> peak_rss_mb=<ours> baseline_peak_rss_mb=<theirs> ceiling_fraction=<f>`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# pandas holds about 3x the file in memory (strings plus the parser's buffers): measured ~3 GB
# per GB of this synthetic file. Above this estimate the baseline runs on a smaller file.
BASELINE_BYTES_PER_INPUT_BYTE = 3.5
READ_CHUNK = 16 << 20


@dataclass
class Run:
    name: str
    input_bytes: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float
    output: dict

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.wall_s


def child_main(kind: str, noteevents: str, out: str) -> None:
    """Run one contender in this (child) process and print what it produced as JSON."""
    out_dir = Path(out)
    if kind == "build":
        from asclepius_r import record_scanner

        record_scanner._compile(out_dir / "record_scanner.so")
        print(json.dumps({}))
    elif kind == "read":
        total = 0
        with open(noteevents, "rb") as raw:
            while chunk := raw.read(READ_CHUNK):
                total += len(chunk)
        print(json.dumps({"bytes": total}))
    elif kind == "ours":
        from asclepius_r.notes import NotePolicy, SplitPolicy, run_notes_stage

        # 2023 held out 517 of the real file's ~3.9 GB; the same share of this file.
        heldout = max(1, round(517 * Path(noteevents).stat().st_size / 3.9e9))
        stats = run_notes_stage(
            noteevents,
            out_dir / "discharge.parquet",
            out_dir / "heldout.parquet",
            out_dir / "heldout_row_ids.txt",
            out_dir / "stats.json",
            NotePolicy(),
            SplitPolicy(heldout_notes=heldout),
        )
        print(json.dumps(stats))
    elif kind == "pandas":
        import pandas as pd

        notes = pd.read_csv(noteevents)
        discharge = notes[notes.CATEGORY == "Discharge summary"]
        discharge.to_parquet(out_dir / "pandas_discharge.parquet")
        print(json.dumps({"rows_read": len(notes), "kept": len(discharge)}))


def measure(kind: str, noteevents: Path, out_dir: Path) -> Run:
    """Run a contender in a child process, its input just read into the page cache; wall time and
    the child's own CPU time and peak RSS."""
    out_dir.mkdir(parents=True, exist_ok=True)
    warm(noteevents)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", kind, str(noteevents), str(out_dir)],
            stdout=subprocess.PIPE,
            stderr=stderr,
            env=env,
        )
        stdout = child.stdout.read()
        # wait4, not wait: it returns this child's own resource usage, peak RSS included.
        _, status, usage = os.wait4(child.pid, 0)
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        child.stdout.close()
        if child.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"{kind} on {noteevents} failed ({child.returncode}):\n{stderr.read().decode()[-3000:]}")
    return Run(
        kind,
        noteevents.stat().st_size,
        wall,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 1024,
        json.loads(stdout),
    )


def warm(path: Path) -> None:
    """Read the file once, so that the next run finds it in the page cache. (Warming once is not
    enough where the kernel pages out idle memory on its own, as DAMON does on the development
    machine: a file idle for a minute is partly back on disk.)"""
    with open(path, "rb") as raw:
        while raw.read(READ_CHUNK):
            pass


def median(runs: list[Run]) -> Run:
    """The run of median wall time (the upper one of an even count)."""
    return sorted(runs, key=lambda run: run.wall_s)[len(runs) // 2]


def synthesize(path: Path, gb: float) -> Path:
    """A synthetic NOTEEVENTS.csv of about `gb` GB, made once and reused while it exists."""
    if not path.exists():
        tmp = path.with_suffix(".partial")
        subprocess.run(
            [sys.executable, "-m", "asclepius_r.demo.noteevents", str(tmp), "--gb", str(gb)], check=True, cwd=REPO
        )
        tmp.rename(path)
    return path


def gzip_once(path: Path) -> Path:
    """`path` gzipped (level 1, `gzip`), made once and reused while it exists."""
    gzipped = path.with_name(path.name + ".gz")
    if not gzipped.exists():
        tmp = gzipped.with_suffix(".partial")
        with open(tmp, "wb") as out:
            subprocess.run(["gzip", "-1", "-c", str(path)], stdout=out, check=True)
        tmp.rename(gzipped)
    return gzipped


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small files (0.1 and 0.03 GB), under a minute")
    parser.add_argument("--gb", type=float, default=2.2, help="size of the main file (default 2.2)")
    parser.add_argument("--small-gb", type=float, help="second size for peak RSS (default a quarter of --gb)")
    parser.add_argument(
        "--max-baseline-gb",
        type=float,
        default=12.0,
        help="run pandas on a smaller file when its estimated memory exceeds this",
    )
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/out/notes_filter")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic files for the next run")
    parser.add_argument(
        "--gzip",
        action="store_true",
        help="also run ours and pandas on the second file gzipped (as PhysioNet ships NOTEEVENTS)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of ours and of pandas on the main file, alternating; the medians count",
    )
    parser.add_argument("--child", nargs=3, metavar=("KIND", "NOTEEVENTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    big_gb = 0.1 if args.quick else args.gb
    small_gb = 0.03 if args.quick else (args.small_gb or big_gb / 4)
    args.workdir.mkdir(parents=True, exist_ok=True)
    big = synthesize(args.workdir / f"NOTEEVENTS-{big_gb}GB.csv", big_gb)
    small = synthesize(args.workdir / f"NOTEEVENTS-{small_gb}GB.csv", small_gb)
    try:
        baseline_file = big
        if big.stat().st_size * BASELINE_BYTES_PER_INPUT_BYTE > args.max_baseline_gb * 1e9:
            baseline_file = small
            print(
                f"pandas would need about {big.stat().st_size * BASELINE_BYTES_PER_INPUT_BYTE / 1e9:.1f} GB "
                f"on {big.name}: its speed is measured on {small.name} instead"
            )
        load_before = os.getloadavg()
        measure("ours", small, args.workdir / "ours_small")  # build the scanner if this install has not
        repeated = {"ours": [], "pandas": []}
        for _ in range(args.repeat):  # alternating, so that a busy spell of the machine hits both
            repeated["ours"].append(measure("ours", big, args.workdir / "ours"))
            repeated["pandas"].append(measure("pandas", baseline_file, args.workdir / "pandas"))
        runs = {
            "read": measure("read", big, args.workdir / "read"),
            "build": measure("build", small, args.workdir / "build"),
            "ours": median(repeated["ours"]),
            "ours_small": measure("ours", small, args.workdir / "ours_small"),
            "pandas": median(repeated["pandas"]),
            "pandas_small": measure("pandas", small, args.workdir / "pandas_small"),
        }
        if args.gzip:
            gzipped = gzip_once(small)
            runs["ours_gzip"] = measure("ours", gzipped, args.workdir / "ours_gzip")
            runs["pandas_gzip"] = measure("pandas", gzipped, args.workdir / "pandas_gzip")
        load_after = os.getloadavg()
    finally:
        if not args.keep:
            for path in (big, small, small.with_name(small.name + ".gz")):
                path.unlink(missing_ok=True)
    ours, pandas = runs["ours"], runs["pandas"]
    print(
        f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.2f}' for x in load_after)} after, on {os.cpu_count()} CPUs"
    )
    for name, each in repeated.items():
        print(
            f"{name} on {big.name if name == 'ours' else baseline_file.name}, {args.repeat} runs: wall "
            f"{', '.join(f'{run.wall_s:.2f}' for run in each)} s; the median run is in the table"
        )
    print(f"{'run':<14}{'input MB':>10}{'wall s':>9}{'CPU s':>8}{'MB/s':>9}{'peak RSS MB':>13}")
    for name, run in runs.items():
        print(
            f"{name:<14}{run.input_bytes / 1e6:>10.0f}{run.wall_s:>9.2f}{run.cpu_s:>8.2f}{run.mb_per_s:>9.0f}"
            f"{run.peak_rss_mb:>13.0f}"
        )
    stats = ours.output
    kept_by_pandas = runs["pandas_small"].output["kept"]
    small_stats = runs["ours_small"].output
    # pandas keeps every discharge row; ours drops ISERROR rows and duplicate texts by default.
    consistent = (
        kept_by_pandas
        == small_stats["kept"] + small_stats["dropped"]["iserror"] + small_stats["dropped"]["duplicate_text"]
    )
    print(
        f"ours: {stats['rows_read']} rows read, {stats['kept']} kept; same discharge rows as pandas on "
        f"{small.name}: {consistent}"
    )
    speedup = ours.mb_per_s / pandas.mb_per_s
    compile_s = runs["build"].wall_s
    first_run_speedup = (ours.input_bytes / (ours.wall_s + compile_s)) / (pandas.input_bytes / pandas.wall_s)
    print(
        f"scanner build (cc), once per install: {compile_s:.2f} s; speedup of a first run after install "
        f"(compile included): {first_run_speedup:.2f}; CPU-time ratio pandas/ours: "
        f"{(pandas.cpu_s / pandas.input_bytes) / (ours.cpu_s / ours.input_bytes):.2f}"
    )
    ceiling_fraction = ours.mb_per_s / runs["read"].mb_per_s
    print(
        f"RESULT speedup={speedup:.2f} peak_rss_mb={ours.peak_rss_mb:.0f} "
        f"baseline_peak_rss_mb={pandas.peak_rss_mb:.0f} ceiling_fraction={ceiling_fraction:.3f}"
    )


if __name__ == "__main__":
    main()
