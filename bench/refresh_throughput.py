"""Throughput of the calibration refresh on a generated window of logged traffic.

    .venv/bin/python bench/refresh_throughput.py                 # 1,000,000 records over a quarter
    .venv/bin/python bench/refresh_throughput.py --records 200000

Stages are timed cumulatively in one run (read -> + parse/validate -> + scrub -> the whole refresh with
dedupe, stratified sampling and writing), so the ratios between rows are what to trust on a shared machine.
The full refresh uses the production profile's split sizes (44,000 / 5,500 / 1,024).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qat_tasks.core import storage  # noqa: E402
from qat_tasks.core.config import load_config, parse_config  # noqa: E402
from qat_tasks.core.schema import parse_line  # noqa: E402
from qat_tasks.data.pii import scrub  # noqa: E402
from qat_tasks.data.refresh import refresh
from qat_tasks.synthetic.generator import generate  # noqa: E402

START = date(2026, 7, 1)


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--days", type=int, default=92)
    ap.add_argument("--corrupt-rate", type=float, default=0.005)
    args = ap.parse_args()
    end = START + timedelta(days=args.days)

    with tempfile.TemporaryDirectory(prefix="refresh-bench-") as tmp:
        src = Path(tmp) / "traffic"
        print(f"generating ~{args.records:,} records over {args.days} days into {src} ...", flush=True)
        gen_s, stats = timed(lambda: generate(str(src), START, end, records_per_day=args.records // args.days,
                                              seed=1, corrupt_rate=args.corrupt_rate, progress=True))
        files = storage.list_log_files(str(src), START, end)
        size_mb = sum(Path(f.uri).stat().st_size for f in files) / 2**20
        print(f"generated {stats['lines']:,} lines in {gen_s:.1f} s ({size_mb:.1f} MB gzip, {len(files)} files)\n")

        def read():
            n = 0
            for f in files:
                for _ in storage.open_lines(f.uri):
                    n += 1
            return n

        def validate():
            n = 0
            for f in files:
                for line in storage.open_lines(f.uri):
                    rec, _ = parse_line(line)
                    n += rec is not None
            return n

        def validate_scrub():
            counts, n = Counter(), 0
            for f in files:
                for line in storage.open_lines(f.uri):
                    rec, _ = parse_line(line)
                    if rec is not None:
                        scrub(rec.text, counts)
                        n += 1
            return n

        demo = load_config().model_dump(mode="json")
        demo["traffic"]["source"] = str(src)
        demo["state_dir"] = str(Path(tmp) / "state")
        demo["calibration"]["sizes"] = {"calibration": 1024, "qat_train": 44000, "evaluation": 5500}
        demo["calibration"]["min_per_intent"] = 200
        cfg = parse_config(demo, "bench")

        rows = []
        lines = stats["lines"]
        for name, fn in [("read (gzip + lines)", read), ("+ parse & validate", validate),
                         ("+ scrub personal data", validate_scrub),
                         ("full refresh (+ dedupe, split, sample, write)", lambda: refresh(cfg, START, end, progress=False))]:
            secs, _ = timed(fn)
            rows.append((name, secs, lines / secs))
            print(f"  {name:<48} {secs:7.2f} s", flush=True)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        result = refresh(cfg, START, end, progress=False)

    full = rows[-1][1]
    print(f"\nRefresh throughput on {lines:,} log lines ({args.days}-day window, 1 process, 2-core machine)\n")
    print(f"| {'stage (cumulative)':<48} | {'seconds':>8} | {'records/s':>10} | {'share of full':>13} |")
    print(f"|{'-' * 50}|{'-' * 10}|{'-' * 12}|{'-' * 15}|")
    for name, secs, rps in rows:
        print(f"| {name:<48} | {secs:8.2f} | {rps:10,.0f} | {secs / full:12.0%} |")
    m = result.manifest
    print(f"\nfull refresh: {m['input']['valid']:,} valid, {m['input']['invalid']:,} quarantined, "
          f"{m['input']['duplicate_texts']:,} duplicate texts; splits "
          + ", ".join(f"{s} {v['rows']:,}" for s, v in m["splits"].items())
          + f"; peak RSS of this process {peak:,.0f} MB")


if __name__ == "__main__":
    main()
