"""4-bit weights for the fallback LLM: unquantized against RTN, AWQ and GPTQ, measured in one run.

    .venv/bin/python bench/llm_4bit_benchmark.py                       # the demo config's SmolLM2-135M
    .venv/bin/python bench/llm_4bit_benchmark.py --variants rtn awq-domain --group-size 128

Self-contained: refreshes calibration data from the bundled traffic sample, dequantises the stand-in model
once (state folder in a temporary directory unless --state), then quantizes each variant exactly as the DAG
does (qat_tasks.llm.quantize) and judges it exactly as the DAG does (qat_tasks.llm.track.evaluate): perplexity
on held-out Wikipedia/news text (gensim's test data) and on held-out MangaAssist conversations, intent-routing
accuracy, size on disk, quantization wall time and peak RSS. Every variant sees bitwise the same windows.

Variants: rtn, awq-domain, gptq-domain, awq-generic, gptq-generic (calibrated on gensim's text instead of
MangaAssist conversations), and rtn-g32: round-to-nearest at group size 32, which lines up with the Q4_1
blocks SmolLM2's weights were stored in and so shows how much that grid flatters 4-bit figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

TARGETS = ("AWQ within 3 % relative perplexity of the unquantized model at group size 128 (the AWQ paper: "
           "+2.4 % on Llama-2-7B); AWQ no worse than GPTQ no worse than RTN")
VARIANTS = ("rtn", "awq-domain", "gptq-domain", "awq-generic", "gptq-generic", "rtn-g32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--model", default="fallback-llm")
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--group-size", type=int, default=None, help="override the config's group size")
    ap.add_argument("--state", default=None, help="state folder to keep (default: a temporary one)")
    args = ap.parse_args()

    tmp = Path(args.state or tempfile.mkdtemp(prefix="llm-bench-"))
    os.environ["QAT_STATE_DIR"] = str(tmp)
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qat_tasks.core import resources
    from qat_tasks.core.config import load_config
    from qat_tasks.core.config_sections import LlmCandidate
    from qat_tasks.data.refresh import refresh
    from qat_tasks.llm import checkpoint
    from qat_tasks.llm import model as llm_model
    from qat_tasks.llm import quantize as llm_quantize
    from qat_tasks.llm.track import evaluate, load_data, quant_spec

    cfg = load_config(args.config)
    mcfg = cfg.model(args.model)
    tc = mcfg.llm_track
    if args.group_size:
        tc = tc.model_copy(update={"group_size": args.group_size})
    window = (cfg.traffic.window.start, cfg.traffic.window.end) if cfg.traffic.window else (date(2026, 7, 1),
                                                                                              date(2026, 10, 1))
    cal = refresh(cfg, *window, progress=False)
    base_dir = llm_model.resolve_llm(cfg, mcfg.source)
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    data = load_data(cfg, tc, cal.uri, tokenizer)
    num_layers = json.loads((base_dir / "config.json").read_text())["num_hidden_layers"]  # no weights loaded
    print(f"{args.model}: {mcfg.source}\ncalibration {cal.version}; {torch.get_num_threads()} thread(s); "
          f"W{tc.bits}A16 group size {tc.group_size}; eval {data.generic_windows.tokens} generic + "
          f"{data.domain_windows.tokens} MangaAssist tokens (window {tc.eval_window}), {len(data.routing_rows)} "
          f"routing rows; calibration {len(data.domain_calibration)} texts x <= {tc.max_seq_len} tokens\n"
          f"targets: {TARGETS}", flush=True)

    rows = []
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    res = evaluate(model, tokenizer, data, tc)
    del model
    rows.append({"variant": "unquantized (fp32)", **res["metrics"], "size_mb": resources.dir_size_bytes(base_dir) / 1e6,
                 "quant_wall_s": 0.0, "peak_rss_mb": float("nan"), "rss_growth_mb": float("nan")})
    print(f"  unquantized measured in {time.perf_counter() - t0:.0f} s", flush=True)
    for variant in args.variants:
        t0 = time.perf_counter()
        vtc, name = tc, variant
        if variant == "rtn-g32":
            vtc, name = tc.model_copy(update={"group_size": 32}), "rtn"
        method, _, calib = name.partition("-")
        cand = LlmCandidate(method=method, calibration=calib or "none")
        texts = {"domain": data.domain_calibration, "generic": data.generic_calibration, "none": []}[cand.calibration]
        out = tmp / "variants" / f"{variant}-g{vtc.group_size}"
        with resources.RssSampler() as rss:
            q = llm_quantize.quantize(base_dir, quant_spec(vtc, cand, num_layers), texts, out / "checkpoint",
                                      work_dir=out / "chunks")
        model, qtok = checkpoint.load_quantized(q.output_dir)
        res = evaluate(model, qtok, data, tc)
        del model
        rows.append({"variant": f"{variant} (g{vtc.group_size})", **res["metrics"], "size_mb": q.size_bytes / 1e6,
                     "quant_wall_s": q.wall_s, "peak_rss_mb": rss.peak_mb, "rss_growth_mb": rss.delta_mb})
        print(f"  {variant}: {time.perf_counter() - t0:.0f} s", flush=True)
    print_table(rows)


def print_table(rows: list[dict]) -> None:
    base = rows[0]
    head = (f"| {'variant':<24} | {'ppl wiki':>8} | {'Δ %':>6} | {'ppl manga':>9} | {'Δ %':>6} | {'routing':>7} | "
            f"{'Δ pts':>6} | {'MB':>6} | {'smaller':>7} | {'quant s':>7} | {'peak RSS MB':>11} | {'+RSS MB':>7} |")
    print("\n" + head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        print(f"| {r['variant']:<24} | {r['perplexity_generic']:8.3f} | "
              f"{100 * (r['perplexity_generic'] / base['perplexity_generic'] - 1):+6.2f} | "
              f"{r['perplexity_domain']:9.3f} | {100 * (r['perplexity_domain'] / base['perplexity_domain'] - 1):+6.2f} | "
              f"{100 * r['routing_accuracy']:7.2f} | {100 * (r['routing_accuracy'] - base['routing_accuracy']):+6.2f} | "
              f"{r['size_mb']:6.1f} | {base['size_mb'] / r['size_mb']:6.2f}x | {r['quant_wall_s']:7.1f} | "
              f"{r['peak_rss_mb']:11.0f} | {r['rss_growth_mb']:7.0f} |")
    by = {r["variant"].split(" ")[0]: r for r in rows}
    if {"rtn", "awq-domain", "gptq-domain"} <= set(by):
        a, g, n = (by[k]["perplexity_generic"] for k in ("awq-domain", "gptq-domain", "rtn"))
        rel = 100 * (a / base["perplexity_generic"] - 1)
        print(f"\nAWQ within 3 % of unquantized (generic text): {'reached' if rel <= 3 else 'not reached'} "
              f"({rel:+.2f} %); AWQ <= GPTQ <= RTN: {'reached' if a <= g <= n else 'not reached'} "
              f"({a:.3f} / {g:.3f} / {n:.3f})")


if __name__ == "__main__":
    main()
