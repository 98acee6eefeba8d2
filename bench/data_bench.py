"""Data-loading benchmark: DICOM decode + preprocessing versus the preprocessed-case cache.

Run from the repository root (``make bench`` calls it this way)::

    .venv/bin/python bench/data_bench.py [--cases N] [--image-size S] [--out bench/results]

It generates one synthetic DICOM site in a temporary folder and measures, in one run:

1. in-process throughput (cases per second, median of ``--repeats`` runs) of
   (a) ``load_site(use_cache=False)``: pydicom decode + preprocessing of every case,
   (b) ``load_site(use_cache=True)`` with a warm cache,
   (c) raw ``pydicom.dcmread(path).pixel_array`` alone, for reference;
2. time until the data is ready in a fresh process (each round of a deployed site starts a
   new process), with an empty cache (first round) and a warm cache (second round).

Results: a table on stdout, ``<out>/data_bench.json`` (every number plus machine info) and
``<out>/data_bench.md`` (a short table of the ratios). See bench/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

_BENCH_START = time.perf_counter()

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "bench" / "results"

# Split settings used by every load (they do not affect the cost being measured).
VAL_FRACTION = 0.15
TEST_FRACTION = 0.15
SPLIT_SEED = 0

# Fixed start-up cost of a round: importing radfed's data module, then MONAI's transforms
# (which load_site imports lazily, only when it has a case to preprocess).
_IMPORT_CHILD = r"""
import time; _t0 = time.perf_counter()
import json
import radfed.data.loading
_t1 = time.perf_counter()
import monai.transforms
_t2 = time.perf_counter()
print(json.dumps({"radfed_import_s": _t1 - _t0, "monai_import_s": _t2 - _t1}))
"""

# The child of part 2. Its first statement takes the clock, so `ready_s` covers importing
# radfed (torch, pydicom, MONAI) plus load_site, but not the interpreter's own start-up;
# the parent's wall time of the subprocess covers that too.
_CHILD = r"""
import time; _t0 = time.perf_counter()
import json, logging, sys
from pathlib import Path
from radfed.data.loading import load_site
from radfed.log import logger
_t_import = time.perf_counter()

class _Grab(logging.Handler):
    hits = None
    def emit(self, record):
        if str(record.msg).startswith("site ready") and isinstance(record.args, tuple):
            _Grab.hits = record.args[-1]

logger.setLevel(logging.INFO)
logger.addHandler(_Grab())
data = load_site(
    Path(sys.argv[1]), image_size=int(sys.argv[2]), val_fraction=float(sys.argv[3]),
    test_fraction=float(sys.argv[4]), seed=int(sys.argv[5]),
)
_t_ready = time.perf_counter()
print(json.dumps({
    "import_s": _t_import - _t0,
    "load_s": _t_ready - _t_import,
    "ready_s": _t_ready - _t0,
    "cases": data.num_cases,
    "from_cache": _Grab.hits,
    "monai_imported": "monai" in sys.modules,
}))
"""


def progress(message: str) -> None:
    """One progress line on stderr, with the time since the benchmark started."""
    print(f"[{time.perf_counter() - _BENCH_START:6.1f}s] {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=400, help="cases in the site (default 400)")
    parser.add_argument(
        "--image-size", type=int, default=64, help="model input size after resize (default 64)"
    )
    parser.add_argument(
        "--source-size",
        type=int,
        default=256,
        help="rows/columns of the generated DICOM images (default 256)",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="runs per in-process measurement (median)"
    )
    parser.add_argument(
        "--fresh-repeats",
        type=int,
        default=2,
        help="fresh-process runs per cache state (median; default 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="synthetic data seed")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="results folder (default bench/results)"
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        default=None,
        help="where to generate the site (default: a temporary folder, removed afterwards)",
    )
    args = parser.parse_args(argv)
    if args.cases < 8:
        parser.error("--cases must be at least 8")
    if args.repeats < 1 or args.fresh_repeats < 1:
        parser.error("--repeats and --fresh-repeats must be at least 1")
    return args


def cases_per_site_for(cases: int, seed: int) -> int:
    """The ``cases_per_site`` that gives the first synthetic site exactly ``cases`` cases."""
    from radfed.data.synth import site_profiles

    guess = max(8, round(cases / 0.8))
    for candidate in sorted(range(max(8, guess - 5), guess + 6), key=lambda c: abs(c - guess)):
        if site_profiles(1, candidate, seed)[0].cases == cases:
            return candidate
    return guess


def machine_info() -> dict[str, Any]:
    # MONAI's version from its metadata, not by importing it: load_site imports it lazily.
    from importlib.metadata import PackageNotFoundError, version

    import numpy
    import pydicom
    import torch

    import radfed

    try:
        monai_version = version("monai")
    except PackageNotFoundError:
        monai_version = "not installed"
    usable: int | None
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        usable = os.cpu_count()
    return {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "cpu_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "versions": {
            "radfed": getattr(radfed, "__version__", "unknown"),
            "torch": torch.__version__,
            "pydicom": pydicom.__version__,
            "numpy": numpy.__version__,
            "monai": monai_version,
        },
    }


def timed(fn: Callable[[], int], repeats: int, label: str) -> dict[str, Any]:
    """Run ``fn`` (which returns the number of cases handled) ``repeats`` times."""
    seconds: list[float] = []
    cases = 0
    for i in range(repeats):
        start = time.perf_counter()
        cases = fn()
        seconds.append(time.perf_counter() - start)
        progress(f"  {label} run {i + 1}/{repeats}: {seconds[-1]:.3f}s ({cases} cases)")
    median = statistics.median(seconds)
    return {
        "cases": cases,
        "runs_s": seconds,
        "median_s": median,
        "cases_per_s": cases / median if median > 0 else float("inf"),
        "ms_per_case": 1000 * median / cases if cases else float("nan"),
    }


def run_child(site_dir: Path, image_size: int) -> dict[str, Any]:
    command = [
        sys.executable,
        "-c",
        _CHILD,
        str(site_dir),
        str(image_size),
        str(VAL_FRACTION),
        str(TEST_FRACTION),
        str(SPLIT_SEED),
    ]
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"fresh-process load failed (exit {done.returncode})")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def fresh_process(
    site_dir: Path, image_size: int, cache_dir: Path, *, warm: bool, repeats: int
) -> dict[str, Any]:
    label = "second round (warm cache)" if warm else "first round (empty cache)"
    runs = []
    for i in range(repeats):
        if not warm:
            shutil.rmtree(cache_dir, ignore_errors=True)
        run = run_child(site_dir, image_size)
        entries = len(list(cache_dir.glob("*.npz"))) if cache_dir.is_dir() else 0
        run["cache_entries_after"] = entries
        runs.append(run)
        progress(
            f"  {label} run {i + 1}/{repeats}: ready {run['ready_s']:.2f}s "
            f"(import {run['import_s']:.2f}s + load {run['load_s']:.2f}s), "
            f"wall {run['wall_s']:.2f}s, {run['from_cache']} of {run['cases']} from cache, "
            f"MONAI imported: {run['monai_imported']}"
        )
    summary: dict[str, Any] = {"runs": runs}
    for key in ("import_s", "load_s", "ready_s", "wall_s"):
        summary[key] = statistics.median(r[key] for r in runs)
    summary["cases"] = runs[-1]["cases"]
    summary["from_cache"] = runs[-1]["from_cache"]
    summary["monai_imported"] = runs[-1]["monai_imported"]
    return summary


def ratio(a: float, b: float) -> float:
    return a / b if b > 0 else float("inf")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    progress("importing radfed, torch, pydicom, MONAI")
    import pydicom

    from radfed.data.cache import CaseCache
    from radfed.data.loading import load_site
    from radfed.data.manifest import read_manifest
    from radfed.data.synth import synth_classification
    from radfed.folders import SiteFolder

    info = machine_info()
    temporary = args.work_dir is None
    work = Path(tempfile.mkdtemp(prefix="radfed-bench-")) if temporary else args.work_dir
    data_root = work / "data"
    try:
        # ---- data -------------------------------------------------------------------------
        per_site = cases_per_site_for(args.cases, args.seed)
        progress(
            f"generating 1 site, {args.cases} cases of {args.source_size}x{args.source_size} "
            f"DICOM in {data_root}"
        )
        start = time.perf_counter()
        summaries = synth_classification(
            data_root,
            sites=1,
            cases_per_site=per_site,
            seed=args.seed,
            image_size=args.source_size,
            overwrite=True,
        )
        synth_s = time.perf_counter() - start
        site_dir = data_root / summaries[0].name
        state_dir = SiteFolder(site_dir).state.path
        cache_dir = SiteFolder(site_dir).state.cache
        paths = [c.image for c in read_manifest(site_dir, "classification").cases]
        dicom_bytes = sum(p.stat().st_size for p in paths)
        progress(f"  {len(paths)} cases, {dicom_bytes / 2**20:.1f} MiB, in {synth_s:.1f}s")

        def load(use_cache: bool) -> int:
            data = load_site(
                site_dir,
                image_size=args.image_size,
                val_fraction=VAL_FRACTION,
                test_fraction=TEST_FRACTION,
                seed=SPLIT_SEED,
                use_cache=use_cache,
            )
            return data.num_cases

        def key_only() -> int:
            keyer = CaseCache(state_dir, {"image_size": args.image_size})
            for path in paths:
                keyer.key(path)
            return len(paths)

        def raw() -> int:
            total = 0
            for path in paths:
                total += int(pydicom.dcmread(path).pixel_array.size > 0)
            return total

        # ---- 1. in-process throughput -----------------------------------------------------
        progress("in-process: filling the cache (warm-up)")
        monai_before_fill = "monai" in sys.modules
        fill = timed(lambda: load(True), 1, "cache fill (decode + write)")
        fill["monai_imported_before"] = monai_before_fill
        cache_bytes = sum(p.stat().st_size for p in cache_dir.glob("*.npz"))
        progress("in-process: decode + preprocess (use_cache=False)")
        decode = timed(lambda: load(False), args.repeats, "decode")
        progress("in-process: warm cache (use_cache=True)")
        cached = timed(lambda: load(True), args.repeats, "cache")
        progress("in-process: raw pydicom dcmread().pixel_array")
        raw_res = timed(raw, args.repeats, "raw pydicom")

        # ---- 2. fresh process per round ---------------------------------------------------
        progress("in-process: cache key alone (SHA-256 of each file), part of every cache hit")
        key_res = timed(key_only, args.repeats, "cache key")

        progress("fresh process: first round (cache folder deleted before each run)")
        first = fresh_process(
            site_dir, args.image_size, cache_dir, warm=False, repeats=args.fresh_repeats
        )
        progress("fresh process: second round (cache left warm)")
        second = fresh_process(
            site_dir, args.image_size, cache_dir, warm=True, repeats=args.fresh_repeats
        )
        progress("fresh process: import-only baseline (radfed.data.loading, then monai.transforms)")
        baseline_runs = []
        for i in range(args.fresh_repeats):
            start = time.perf_counter()
            done = subprocess.run(
                [sys.executable, "-c", _IMPORT_CHILD], check=True, capture_output=True, text=True
            )
            run = json.loads(done.stdout.strip().splitlines()[-1])
            run["wall_s"] = time.perf_counter() - start
            baseline_runs.append(run)
            progress(
                f"  import-only run {i + 1}/{args.fresh_repeats}: radfed.data.loading "
                f"{run['radfed_import_s']:.2f}s, then monai.transforms "
                f"{run['monai_import_s']:.2f}s, wall {run['wall_s']:.2f}s"
            )
        imports = {
            key: statistics.median(r[key] for r in baseline_runs)
            for key in ("radfed_import_s", "monai_import_s", "wall_s")
        }
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)

    # ---- 3. report -----------------------------------------------------------------------
    ratios = {
        "cache_vs_decode_cases_per_s": ratio(cached["cases_per_s"], decode["cases_per_s"]),
        "cache_vs_raw_pydicom_cases_per_s": ratio(cached["cases_per_s"], raw_res["cases_per_s"]),
        "raw_pydicom_vs_decode_cases_per_s": ratio(raw_res["cases_per_s"], decode["cases_per_s"]),
        "fresh_first_vs_second_ready": ratio(first["ready_s"], second["ready_s"]),
        "fresh_first_vs_second_wall": ratio(first["wall_s"], second["wall_s"]),
        "fresh_first_vs_second_load_only": ratio(first["load_s"], second["load_s"]),
    }
    results: dict[str, Any] = {
        "benchmark": "radfed data loading: decode vs preprocessed cache",
        "timestamp": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": [Path(sys.executable).name, *sys.argv],
        "settings": {
            "cases": len(paths),
            "source_size": args.source_size,
            "image_size": args.image_size,
            "repeats": args.repeats,
            "fresh_repeats": args.fresh_repeats,
            "seed": args.seed,
            "dicom_mib": dicom_bytes / 2**20,
            "cache_mib": cache_bytes / 2**20,
            "synth_s": synth_s,
        },
        "machine": info,
        "in_process": {
            "cache_fill": fill,
            "decode": decode,
            "cache": cached,
            "raw_pydicom": raw_res,
            "cache_key_only": key_res,
        },
        "fresh_process": {
            "first_round_empty_cache": first,
            "second_round_warm_cache": second,
            "import_only": {**imports, "runs": baseline_runs},
        },
        "ratios": ratios,
        "total_s": time.perf_counter() - _BENCH_START,
    }

    table = render_table(results)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "data_bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "data_bench.md").write_text(render_markdown(results))
    progress(f"wrote {args.out / 'data_bench.json'} and {args.out / 'data_bench.md'}")
    return 0


def render_table(r: dict[str, Any]) -> str:
    s, ip, fp, q = r["settings"], r["in_process"], r["fresh_process"], r["ratios"]
    m = r["machine"]
    lines = [
        "",
        f"radfed data bench: {s['cases']} cases, {s['source_size']}px DICOM -> "
        f"{s['image_size']}px, {m['cpu_usable']} CPUs, torch {m['versions']['torch']}, "
        f"pydicom {m['versions']['pydicom']}",
        "",
        f"{'in-process (median of ' + str(s['repeats']) + ')':<36}{'cases/s':>10}"
        f"{'ms/case':>10}{'median s':>10}",
    ]
    for name, key in (
        ("decode + preprocess (no cache)", "decode"),
        ("warm cache", "cache"),
        ("raw pydicom pixel_array", "raw_pydicom"),
        ("cache key alone (SHA-256 per file)", "cache_key_only"),
        ("cache fill (1 run, decode + write)", "cache_fill"),
    ):
        x = ip[key]
        lines.append(
            f"{name:<36}{x['cases_per_s']:>10.1f}{x['ms_per_case']:>10.2f}{x['median_s']:>10.3f}"
        )
    first, second = fp["first_round_empty_cache"], fp["second_round_warm_cache"]
    lines += [
        "",
        f"{'fresh process (median of ' + str(s['fresh_repeats']) + ')':<36}{'ready s':>10}"
        f"{'import s':>10}{'load s':>10}{'wall s':>10}",
    ]
    for name, x in (("first round (empty cache)", first), ("second round (warm cache)", second)):
        lines.append(
            f"{name:<36}{x['ready_s']:>10.2f}{x['import_s']:>10.2f}{x['load_s']:>10.2f}"
            f"{x['wall_s']:>10.2f}"
        )
    imp = fp["import_only"]
    lines.append(
        f"{'imports only (no load)':<36}{'':>10}{imp['radfed_import_s']:>10.2f}"
        f"{'':>10}{imp['wall_s']:>10.2f}"
    )
    lines.append(
        f"  of which lazy 'import monai.transforms' (first-round load only): "
        f"{imp['monai_import_s']:.2f}s"
    )
    lines += [
        "",
        f"cache vs decode:            {q['cache_vs_decode_cases_per_s']:6.1f}x cases/s",
        f"raw pydicom vs decode:      {q['raw_pydicom_vs_decode_cases_per_s']:6.1f}x cases/s",
        f"first vs second round:      {q['fresh_first_vs_second_ready']:6.1f}x time to ready "
        f"({q['fresh_first_vs_second_wall']:.1f}x wall, "
        f"{q['fresh_first_vs_second_load_only']:.1f}x load_site alone)",
        f"total benchmark time: {r['total_s']:.0f}s",
        "",
    ]
    return "\n".join(lines)


def render_markdown(r: dict[str, Any]) -> str:
    s, ip, fp, q, m = r["settings"], r["in_process"], r["fresh_process"], r["ratios"], r["machine"]
    first, second = fp["first_round_empty_cache"], fp["second_round_warm_cache"]
    return "\n".join(
        [
            "# radfed data bench",
            "",
            f"{s['cases']} cases, {s['source_size']}x{s['source_size']} DICOM -> "
            f"{s['image_size']}x{s['image_size']}; {m['platform']}, {m['cpu_usable']} usable "
            f"CPUs; Python {m['python']}, torch {m['versions']['torch']}, "
            f"pydicom {m['versions']['pydicom']}, MONAI {m['versions']['monai']}; "
            f"{r['timestamp']}.",
            "",
            "| measurement | value | ratio |",
            "|---|---:|---:|",
            f"| decode + preprocess, no cache | {ip['decode']['cases_per_s']:.1f} cases/s | 1.0x |",
            f"| warm cache | {ip['cache']['cases_per_s']:.1f} cases/s | "
            f"**cache vs decode: {q['cache_vs_decode_cases_per_s']:.1f}x cases/s** |",
            f"| raw pydicom `pixel_array` | {ip['raw_pydicom']['cases_per_s']:.1f} cases/s | "
            f"{q['raw_pydicom_vs_decode_cases_per_s']:.1f}x decode |",
            f"| cache key alone (SHA-256 of each file) | "
            f"{ip['cache_key_only']['cases_per_s']:.1f} cases/s | part of every cache hit |",
            f"| fresh process, first round (empty cache) | {first['ready_s']:.2f} s to ready "
            f"({first['wall_s']:.2f} s wall) | 1.0x |",
            f"| fresh process, second round (warm cache) | {second['ready_s']:.2f} s to ready "
            f"({second['wall_s']:.2f} s wall) | "
            f"**first vs second round: {q['fresh_first_vs_second_ready']:.1f}x time to ready** |",
            f"| imports only, fresh process | {fp['import_only']['wall_s']:.2f} s wall "
            f"(radfed.data.loading {fp['import_only']['radfed_import_s']:.2f} s + lazy "
            f"monai.transforms {fp['import_only']['monai_import_s']:.2f} s) | "
            "radfed: every round; MONAI: rounds that decode |",
            "",
            f"In-process numbers: median of {s['repeats']} runs; fresh-process numbers: median "
            f"of {s['fresh_repeats']} runs. Full numbers: `data_bench.json`.",
            "",
        ]
    )


if __name__ == "__main__":
    raise SystemExit(main())
