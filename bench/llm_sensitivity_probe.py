"""How small can the LLM's per-block sensitivity probe be? The probe the main job runs against a larger one.

    .venv/bin/python bench/llm_sensitivity_probe.py                  # 512 tokens (demo) against 2048 (full)
    .venv/bin/python bench/llm_sensitivity_probe.py --tokens 256 512 1024 2048 4096

Each size measures, on the same held-out generic text (the track's sensitivity windows, cut to that many tokens),
the perplexity increase when one unit alone (a decoder block, or lm_head) is rounded to 4 bits; the largest size
is the reference. For each smaller size the table gives the Spearman rank correlation of the units' increases
with the reference, how many of the reference's five and ten most sensitive units it also names, and its wall
time. The bit allocator and the report read the top of this ranking, so agreement at the top is what matters.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def spearman(a: list[float], b: list[float]) -> float:
    import numpy as np
    from scipy.stats import rankdata

    ra, rb = rankdata(a), rankdata(b)
    return float(np.corrcoef(ra, rb)[0, 1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--model", default="fallback-llm")
    ap.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--state", default=None, help="state folder to keep (default: a temporary one)")
    args = ap.parse_args()

    tmp = Path(args.state or tempfile.mkdtemp(prefix="llm-probe-"))
    os.environ["QAT_STATE_DIR"] = str(tmp)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_tasks.core.config import load_config
    from qat_tasks.llm import corpora, perplexity
    from qat_tasks.llm import model as llm_model
    from qat_tasks.llm.sensitivity import block_sensitivity

    cfg = load_config(args.config)
    tc = cfg.model(args.model).llm_track
    base_dir = llm_model.resolve_llm(cfg, cfg.model(args.model).source)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    heldout = corpora.generic_texts()["heldout"]
    sizes = sorted(set(args.tokens))
    print(f"{args.model}: per-unit RTN W{tc.bits} g{tc.group_size} probe, window {tc.eval_window}, "
          f"{torch.get_num_threads()} thread(s), {date.today()}", flush=True)
    reports = {}
    for n in sizes:
        windows = perplexity.TokenWindows(tokenizer, heldout, tc.eval_window, n, name=f"probe {n}")
        t0 = time.perf_counter()
        rep = block_sensitivity(model, windows, perplexity.perplexity, tc.bits, tc.group_size, tc.rtn_symmetric,
                                progress=False)
        reports[n] = (rep, time.perf_counter() - t0)
        print(f"  {n} tokens: {reports[n][1]:.0f} s; most sensitive {rep['most_sensitive'][:5]}", flush=True)
    ref_n = sizes[-1]
    ref = reports[ref_n][0]
    ref_inc = [r["increase_pct"] for r in ref["rows"]]
    print(f"\n| tokens | wall s | Spearman vs {ref_n} | top-5 shared | top-10 shared | top 5 |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        rep, wall = reports[n]
        inc = [r["increase_pct"] for r in rep["rows"]]
        top5 = len(set(rep["most_sensitive"][:5]) & set(ref["most_sensitive"][:5]))
        top10 = len(set(rep["most_sensitive"][:10]) & set(ref["most_sensitive"][:10]))
        print(f"| {n} | {wall:.0f} | {spearman(inc, ref_inc):.3f} | {top5}/5 | {top10}/10 | "
              f"{', '.join(rep['most_sensitive'][:5])} |")


if __name__ == "__main__":
    main()
