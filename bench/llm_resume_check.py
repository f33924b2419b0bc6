"""A 4-bit quantization killed part-way resumes without redoing finished layers, and ends bit-identical.

    .venv/bin/python bench/llm_resume_check.py                        # GPTQ on the demo's SmolLM2-135M
    .venv/bin/python bench/llm_resume_check.py --method awq --kill-after 1 --chunk-layers 10

Three processes, each quantizing the real stand-in model exactly as the DAG does (qat_tasks.llm.quantize):
  1. killed with SIGKILL (no cleanup, like an OOM kill or a lost spot node) as soon as `--kill-after` chunks
     of decoder blocks are on disk;
  2. the same call again, which resumes from those chunks and finishes;
  3. an uninterrupted run into fresh folders, the reference.
Prints each attempt's chunks computed and resumed and its wall time, and whether the resumed checkpoint's
weights are byte-for-byte those of the reference.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def child(args) -> None:
    from qat_tasks.core.config import load_config
    from qat_tasks.core.config_sections import LlmCandidate
    from qat_tasks.llm import corpora
    from qat_tasks.llm import model as llm_model
    from qat_tasks.llm import quantize as llm_quantize
    from qat_tasks.llm.track import quant_spec

    cfg = load_config(args.config)
    mcfg = cfg.model(args.model)
    tc = mcfg.llm_track.model_copy(update={"chunk_layers": args.chunk_layers})
    base = llm_model.resolve_llm(cfg, mcfg.source)
    n_layers = json.loads((base / "config.json").read_text())["num_hidden_layers"]
    texts = corpora.generic_texts()["calibration"][: tc.calibration_samples]
    spec = quant_spec(tc, LlmCandidate(method=args.method, calibration="generic"), n_layers)

    def maybe_die(k: int, total: int) -> None:
        print(json.dumps({"chunk_done": k + 1, "of": total}), flush=True)
        if args.kill_after and k + 1 == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)

    t0 = time.perf_counter()
    res = llm_quantize.quantize(base, spec, texts, Path(args.out) / "checkpoint", work_dir=Path(args.out) / "chunks",
                                progress=False, on_chunk_done=maybe_die)
    print(json.dumps({"result": {"chunks_total": res.chunks_total, "chunks_resumed": res.chunks_resumed,
                                 "wall_s": time.perf_counter() - t0, "output": res.output_dir}}), flush=True)


def attempt(args, out: Path, kill_after: int) -> dict:
    cmd = [sys.executable, __file__, "--child", "--config", args.config or "", "--model", args.model, "--method",
           args.method, "--chunk-layers", str(args.chunk_layers), "--out", str(out), "--kill-after", str(kill_after)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    lines = [json.loads(x) for x in proc.stdout.splitlines() if x.startswith("{")]
    done = [x for x in lines if "chunk_done" in x]
    result = next((x["result"] for x in lines if "result" in x), None)
    if result is None and proc.returncode != -signal.SIGKILL:
        sys.exit(f"attempt failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return {"exit": proc.returncode, "chunks_on_disk": len(done), "result": result, "wall_s": wall}


def weights_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default=None)
    ap.add_argument("--model", default="fallback-llm")
    ap.add_argument("--method", default="gptq", choices=["rtn", "awq", "gptq"])
    ap.add_argument("--chunk-layers", type=int, default=10)
    ap.add_argument("--kill-after", type=int, default=2, help="SIGKILL the first attempt after this many chunks")
    ap.add_argument("--state", default=None, help="state folder (reuse one that holds the dequantised model)")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.config = args.config or None
    if args.state:
        os.environ["QAT_STATE_DIR"] = args.state
    if args.child:
        child(args)
        return
    tmp = Path(tempfile.mkdtemp(prefix="llm-resume-"))
    os.environ.setdefault("QAT_STATE_DIR", str(tmp / "state"))
    first = attempt(args, tmp / "run", args.kill_after)
    second = attempt(args, tmp / "run", 0)
    reference = attempt(args, tmp / "reference", 0)
    same = weights_digest(Path(second["result"]["output"])) == weights_digest(Path(reference["result"]["output"]))
    total = reference["result"]["chunks_total"]
    print(f"{args.method} on {args.model}, {total} chunks of {args.chunk_layers} decoder blocks\n")
    print("| attempt                         | exit    | chunks computed | chunks resumed | wall s |")
    print("|---------------------------------|---------|-----------------|----------------|--------|")
    print(f"| 1. killed after chunk {args.kill_after:<10}| SIGKILL | {first['chunks_on_disk']:>15} | {0:>14} | "
          f"{first['wall_s']:6.1f} |")
    r2 = second["result"]
    print(f"| 2. rerun (resume)               | {second['exit']:<7} | {r2['chunks_total'] - r2['chunks_resumed']:>15} | "
          f"{r2['chunks_resumed']:>14} | {second['wall_s']:6.1f} |")
    print(f"| 3. uninterrupted reference      | {reference['exit']:<7} | {total:>15} | {0:>14} | "
          f"{reference['wall_s']:6.1f} |")
    print(f"\nresumed checkpoint weights identical to the uninterrupted run: {'yes' if same else 'NO'}; "
          f"killed + resumed = {first['wall_s'] + second['wall_s']:.1f} s against {reference['wall_s']:.1f} s")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
