"""Benchmark: the streaming notes stage against pandas, polars and pyarrow, on synthetic NOTEEVENTS.

The baseline is what the 2023 script did: read the whole file with pandas, keep
`CATEGORY == 'Discharge summary'`, write the result (here Parquet, like ours). Beside it, what a
user would pick today, each keeping the same rows and writing Parquet: polars'
`scan_csv().filter().sink_parquet()` and pyarrow's streaming CSV reader (`open_csv`, quoted
newlines allowed, every column a string) feeding a ParquetWriter. They only filter: none checks
the file or applies the policies, the split or the dedup that ours does.

Files of two shapes: the real category mix (many short notes, 1.95 kB per row) and discharge
summaries only (fewer, long notes, about 9.5 kB per row), of the same size. Each contender runs in
its own process, so that its wall time includes its imports and its memory is its own, as is its
CPU time (user + system: the fairer figure when other work shares the machine; the load average is
printed too). Every run starts with its input just read into the page cache (see warm). The
ceiling is the raw read speed of the same file. Each contender runs --repeat times on each shape,
in turns; the median counts.

Memory: peak RSS as wait4 reports it counts file pages the process has mapped (ours reads the
input through mmap, so the page-cache pages it touches count, though the kernel can drop them at
any time) beside anonymous memory (heap, Arrow buffers), which is what the process really needs.
The two are sampled apart from /proc/PID/status (RssAnon, RssFile + RssShmem) every 10 ms, and
their peaks are printed next to wait4's figure. (wait4's figure is also at least this process's own
high-water mark, since a child started by vfork and exec inherits it; this process stays small.)
Peak RSS is also measured at a quarter of the size to show whether memory grows with the input.

Our stage's scanner (asclepius_r/notes/record_scanner.c) is compiled once per install (`make venv`);
the `build` run times that compilation alone, into a temporary folder, and the speedup of a first
run with it included is printed beside the steady-state one that the RESULT line gives.

    python bench/notes_filter.py             # 2.2 GB files of both shapes and 0.55 GB, 3 runs each (heavy)
    python bench/notes_filter.py --quick     # small files, about a minute
    python bench/notes_filter.py --gzip      # and ours and pandas on the small file gzipped

The last line printed is `RESULT speedup=<x over pandas> speedup_polars=<x> speedup_pyarrow=<x>
peak_rss_mb=<ours> peak_anon_mb=<ours> baseline_peak_rss_mb=<pandas> ceiling_fraction=<f>` (the
real-mix file).
"""

from __future__ import annotations

import argparse
import gc
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
SAMPLE_S = 0.01  # how often a child's memory is sampled from /proc
CONTENDERS = ("ours", "polars", "pyarrow", "pandas")
SHAPES = ("mix", "long")  # the real category mix; discharge summaries only


@dataclass
class Run:
    name: str
    input_bytes: int
    wall_s: float
    cpu_s: float
    peak_rss_mb: float  # wait4's figure: anonymous and file-backed pages together
    peak_anon_mb: float  # sampled
    peak_file_mb: float  # sampled: mapped file pages and shared memory
    output: dict

    @property
    def mb_per_s(self) -> float:
        return self.input_bytes / 1e6 / self.wall_s


def child_main(kind: str, noteevents: str, out: str) -> None:
    """Run one contender in this (child) process and print what it produced as JSON."""
    out_dir = Path(out)
    if kind == "build":
        from asclepius_r.notes import record_scanner

        record_scanner._compile(out_dir / "record_scanner.so")
        print(json.dumps({}))
    elif kind == "read":
        total = 0
        with open(noteevents, "rb") as raw:
            while chunk := raw.read(READ_CHUNK):
                total += len(chunk)
        print(json.dumps({"bytes": total}))
    elif kind == "ours":
        from asclepius_r.notes.stage import NotePolicy, SplitPolicy, run_notes_stage

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
        print(json.dumps(stats), flush=True)
        gc.freeze()  # as scripts/filter_notes.py does before the process ends
    elif kind == "polars":
        import polars as pl

        out_file = out_dir / "polars_discharge.parquet"
        pl.scan_csv(noteevents, infer_schema=False).filter(pl.col("CATEGORY") == "Discharge summary").sink_parquet(
            out_file
        )
        print(json.dumps({"kept": pl.scan_parquet(out_file).select(pl.len()).collect().item()}))
    elif kind == "pyarrow":
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.csv as pv
        import pyarrow.parquet as pq

        from asclepius_r.notes.noteevents import COLUMNS

        reader = pv.open_csv(
            noteevents,
            parse_options=pv.ParseOptions(newlines_in_values=True),
            convert_options=pv.ConvertOptions(column_types=dict.fromkeys(COLUMNS, pa.string())),
        )
        rows = kept = 0
        with pq.ParquetWriter(out_dir / "pyarrow_discharge.parquet", reader.schema) as writer:
            for batch in reader:
                selected = batch.filter(pc.equal(batch.column("CATEGORY"), "Discharge summary"))
                writer.write_batch(selected)
                rows, kept = rows + batch.num_rows, kept + selected.num_rows
        print(json.dumps({"rows_read": rows, "kept": kept}))
    elif kind == "pandas":
        import pandas as pd

        notes = pd.read_csv(noteevents)
        discharge = notes[notes.CATEGORY == "Discharge summary"]
        discharge.to_parquet(out_dir / "pandas_discharge.parquet")
        print(json.dumps({"rows_read": len(notes), "kept": len(discharge)}))


def resident_mb(pid: int) -> tuple[float, float]:
    """(anonymous, file-backed + shared) resident memory of a process, in MB; zeros once it has exited."""
    fields = {}
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                name, _, value = line.partition(":")
                if name in ("RssAnon", "RssFile", "RssShmem"):
                    fields[name] = int(value.split()[0]) / 1024
    except OSError:
        pass
    return fields.get("RssAnon", 0.0), fields.get("RssFile", 0.0) + fields.get("RssShmem", 0.0)


def measure(kind: str, noteevents: Path, out_dir: Path) -> Run:
    """Run a contender in a child process, its input just read into the page cache; wall time, the
    child's own CPU time and peak RSS (wait4), and its peak anonymous and file-backed memory (sampled)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    warm(noteevents)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    peak_anon = peak_file = 0.0
    start = time.perf_counter()
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        child = subprocess.Popen(
            [sys.executable, __file__, "--child", kind, str(noteevents), str(out_dir)],
            stdout=stdout,
            stderr=stderr,
            env=env,
        )
        # wait4, not wait: it returns this child's own resource usage, peak RSS included.
        while not (waited := os.wait4(child.pid, os.WNOHANG))[0]:
            anon, file_backed = resident_mb(child.pid)
            peak_anon, peak_file = max(peak_anon, anon), max(peak_file, file_backed)
            time.sleep(SAMPLE_S)
        _, status, usage = waited
        wall = time.perf_counter() - start
        child.returncode = os.waitstatus_to_exitcode(status)
        if child.returncode != 0:
            stderr.seek(0)
            raise SystemExit(f"{kind} on {noteevents} failed ({child.returncode}):\n{stderr.read().decode()[-3000:]}")
        stdout.seek(0)
        output = json.loads(stdout.read())
    return Run(
        kind,
        noteevents.stat().st_size,
        wall,
        usage.ru_utime + usage.ru_stime,
        usage.ru_maxrss / 1024,
        peak_anon,
        peak_file,
        output,
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


def synthesize(path: Path, gb: float, shape: str = "mix") -> Path:
    """A synthetic NOTEEVENTS.csv of about `gb` GB in `shape`, made once and reused while it exists."""
    if not path.exists():
        tmp = path.with_suffix(".partial")
        subprocess.run(
            [sys.executable, "-m", "support.synthetic_notes", str(tmp), "--gb", str(gb)]
            + (["--discharge-only"] if shape == "long" else []),
            check=True,
            cwd=REPO,
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
    parser.add_argument("--quick", action="store_true", help="small files (0.1 and 0.03 GB), about a minute")
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
        help="also run ours and pandas on the small file gzipped (as PhysioNet ships NOTEEVENTS)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=3,
        help="runs of each contender on each shape, in turns; the medians count",
    )
    parser.add_argument("--child", nargs=3, metavar=("KIND", "NOTEEVENTS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(*args.child)
        return
    big_gb = 0.1 if args.quick else args.gb
    small_gb = 0.03 if args.quick else (args.small_gb or big_gb / 4)
    args.workdir.mkdir(parents=True, exist_ok=True)
    files = {
        shape: synthesize(
            args.workdir / f"NOTEEVENTS-{'long-' if shape == 'long' else ''}{big_gb}GB.csv", big_gb, shape
        )
        for shape in SHAPES
    }
    small = synthesize(args.workdir / f"NOTEEVENTS-{small_gb}GB.csv", small_gb)
    try:
        baseline_files = {}
        for shape, path in files.items():
            baseline_files[shape] = path
            if path.stat().st_size * BASELINE_BYTES_PER_INPUT_BYTE > args.max_baseline_gb * 1e9:
                baseline_files[shape] = small
                print(
                    f"pandas would need about {path.stat().st_size * BASELINE_BYTES_PER_INPUT_BYTE / 1e9:.1f} GB "
                    f"on {path.name}: its speed is measured on {small.name} instead"
                )
        load_before = os.getloadavg()
        measure("ours", small, args.workdir / "ours_small")  # build the scanner if this install has not
        repeated = {(kind, shape): [] for shape in SHAPES for kind in CONTENDERS}
        for _ in range(args.repeat):  # in turns, so that a busy spell of the machine hits every contender
            for shape, path in files.items():
                for kind in CONTENDERS:
                    target = baseline_files[shape] if kind == "pandas" else path
                    repeated[kind, shape].append(measure(kind, target, args.workdir / kind))
        runs = {
            "read": measure("read", files["mix"], args.workdir / "read"),
            "build": measure("build", small, args.workdir / "build"),
            **{f"{kind} {shape}": median(each) for (kind, shape), each in repeated.items()},
            "ours small": measure("ours", small, args.workdir / "ours_small"),
            "pandas small": measure("pandas", small, args.workdir / "pandas_small"),
        }
        if args.gzip:
            gzipped = gzip_once(small)
            runs["ours gzip"] = measure("ours", gzipped, args.workdir / "ours_gzip")
            runs["pandas gzip"] = measure("pandas", gzipped, args.workdir / "pandas_gzip")
        load_after = os.getloadavg()
    finally:
        if not args.keep:
            for path in (*files.values(), small, small.with_name(small.name + ".gz")):
                path.unlink(missing_ok=True)
    print(
        f"load average (1, 5, 15 min): {' '.join(f'{x:.2f}' for x in load_before)} before, "
        f"{' '.join(f'{x:.2f}' for x in load_after)} after, on {os.cpu_count()} CPUs"
    )
    for (kind, shape), each in repeated.items():
        target = baseline_files[shape] if kind == "pandas" else files[shape]
        print(f"{kind} on {target.name}: wall {', '.join(f'{run.wall_s:.2f}' for run in each)} s")
    print(
        f"{'run':<16}{'input MB':>10}{'wall s':>9}{'CPU s':>8}{'MB/s':>9}{'peak RSS MB':>13}"
        f"{'anon MB':>9}{'file MB':>9}"
    )
    for name, run in runs.items():
        print(
            f"{name:<16}{run.input_bytes / 1e6:>10.0f}{run.wall_s:>9.2f}{run.cpu_s:>8.2f}{run.mb_per_s:>9.0f}"
            f"{run.peak_rss_mb:>13.0f}{run.peak_anon_mb:>9.0f}{run.peak_file_mb:>9.0f}"
        )
    for shape in SHAPES:
        kept = {kind: runs[f"{kind} {shape}"].output["kept"] for kind in ("polars", "pyarrow", "pandas")}
        if baseline_files[shape] != files[shape]:
            kept.pop("pandas")
        print(f"{shape}: discharge rows kept by {kept}; the same: {len(set(kept.values())) == 1}")
    small_stats = runs["ours small"].output
    # pandas keeps every discharge row; ours drops ISERROR rows and duplicate texts by default.
    consistent = runs["pandas small"].output["kept"] == (
        small_stats["kept"] + small_stats["dropped"]["iserror"] + small_stats["dropped"]["duplicate_text"]
    )
    print(f"ours: the same discharge rows as pandas on {small.name}: {consistent}")
    ours, pandas = runs["ours mix"], runs["pandas mix"]
    speedups = {kind: ours.mb_per_s / runs[f"{kind} mix"].mb_per_s for kind in CONTENDERS[1:]}
    compile_s = runs["build"].wall_s
    first_run_speedup = (ours.input_bytes / (ours.wall_s + compile_s)) / (pandas.input_bytes / pandas.wall_s)
    print(
        f"scanner build (cc), once per install: {compile_s:.2f} s; speedup over pandas of a first run after "
        f"install (compile included): {first_run_speedup:.2f}; CPU-time ratio pandas/ours: "
        f"{(pandas.cpu_s / pandas.input_bytes) / (ours.cpu_s / ours.input_bytes):.2f}"
    )
    ceiling_fraction = ours.mb_per_s / runs["read"].mb_per_s
    print(
        f"RESULT speedup={speedups['pandas']:.2f} speedup_polars={speedups['polars']:.2f} "
        f"speedup_pyarrow={speedups['pyarrow']:.2f} peak_rss_mb={ours.peak_rss_mb:.0f} "
        f"peak_anon_mb={ours.peak_anon_mb:.0f} baseline_peak_rss_mb={pandas.peak_rss_mb:.0f} "
        f"ceiling_fraction={ceiling_fraction:.3f}"
    )


if __name__ == "__main__":
    main()
