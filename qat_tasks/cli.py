"""`qat-tasks`: every pipeline stage without Airflow.

  qat-tasks validate-config configs/demo.yaml configs/production.yaml
  qat-tasks generate-traffic --out data/traffic_sample --start 2026-07-01 --end 2026-10-01 --per-day 1000 --corrupt-rate 0.004
  qat-tasks generate-traffic --out .state/live-traffic --start 2026-11-22 --end 2026-11-23 --drift catalogue_launch
  qat-tasks refresh --start 2026-07-01 --end 2026-10-01 --reason "drift in checkout_help"
  qat-tasks import-labels reviews.csv        # review labels from a labelling tool, joined by the next refresh
  qat-tasks run --reason "manual recalibration" [--models intent-classifier] [--start .. --end ..]
      (refresh, champion, champion evaluation, INT8 candidates, gates, @challenger; the LLM's 4-bit track)
  qat-tasks run --reason "requantize the LLM" --models fallback-llm --run-id cli__a1b2   # rerun: resumes
  qat-tasks serve --model intent-classifier [--port 8080] [--no-mirror]   # @champion answers, @shadow mirrored
  qat-tasks shadow-review --model intent-classifier --reason "..." [--replay --start .. --end ..]
  qat-tasks promote --model intent-classifier --reason "shadow review passed"   # refuses without a passed review
  qat-tasks rollback --model intent-classifier --reason "P95 regression after promotion"
  qat-tasks drift-check --end 2026-10-01 [--days 1] --reason "..."
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import uuid
from datetime import UTC, date, datetime

from qat_tasks.core.config import ConfigError, load_config
from qat_tasks.core.params import MIN_REASON_CHARS


def _date(s: str) -> date:
    try:
        return date.fromisoformat(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO date (YYYY-MM-DD): {s!r}") from None


def _plan(args, cfg) -> dict:
    from qat_tasks.pipeline import plan_run

    params = {"reason": args.reason, "models": args.models or [], "triggered_by": "manual",
              "window_start": args.start.isoformat() if args.start else None,
              "window_end": args.end.isoformat() if args.end else None}
    run_id = args.run_id or f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S}__{uuid.uuid4().hex[:6]}"
    return plan_run(cfg, params, dag_id="quarterly_recalibration", run_id=run_id, run_type="cli", reference=None)


def _operate(args, cfg) -> int:
    """Review, promotion, rollback and drift checks by hand: each one an MLflow run like the DAGs' own."""
    from qat_tasks.core.tracking import RunContext
    from qat_tasks.promotion import release, shadow
    from qat_tasks.serving import replay

    if len(args.reason.strip()) < MIN_REASON_CHARS:
        raise ValueError(f"--reason: say why (at least {MIN_REASON_CHARS} characters)")
    if getattr(args, "model", None) is not None:
        cfg.model(args.model)  # an unknown name is an error that lists the known ones
    ctx = RunContext(dag_id=f"cli-{args.command}", run_id=f"cli__{datetime.now(UTC):%Y%m%dT%H%M%S}__"
                     f"{uuid.uuid4().hex[:6]}", reason=args.reason.strip(), trigger="manual")
    if args.command == "promote":
        import getpass

        try:
            user = getpass.getuser()
        except (KeyError, OSError):  # no passwd entry (some containers)
            user = "unknown-user"
        # The person running the command is the approval a manual promotion needs.
        result = release.promote(cfg, args.model, ctx, args.version, approved_by=f"cli:{user}")
    elif args.command == "rollback":
        result = release.rollback(cfg, args.model, ctx)
    elif args.command == "drift-check":
        from datetime import timedelta

        from qat_tasks.monitoring.drift import monitor

        end = args.end or datetime.now(UTC).date()
        result = monitor(cfg, end - timedelta(days=args.days or cfg.drift.window_days), end, ctx)
    elif args.replay:
        if not (args.start and args.end):
            raise ValueError("--replay needs --start and --end (the window of logged traffic to replay)")
        from qat_tasks.core import registry, tracking

        version = registry.alias_version(tracking.configure(cfg), tracking.registered_name(cfg, args.model),
                                         registry.SHADOW)
        if version is None:
            raise ValueError(f"{args.model} has no @shadow to review")
        replay_cfg = cfg.model_copy(update={"shadow": cfg.shadow.model_copy(update={"review": "replay"})})
        result = replay.shadow_challenger(replay_cfg, {"model": args.model, "registered_version": str(version.version)},
                                          {"start": args.start.isoformat(), "end": args.end.isoformat()}, ctx)
    else:
        result = shadow.review_live(cfg, args.model, ctx)
    print(json.dumps(result, indent=1, default=str))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="qat-tasks", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config", help="pipeline config (default: $QAT_CONFIG or configs/demo.yaml)")
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate-config", help="parse config files and report every problem")
    p.add_argument("paths", nargs="+")

    p = sub.add_parser("generate-traffic", help="write generated MangaAssist traffic (folder or s3://)")
    p.add_argument("--out", required=True)
    p.add_argument("--start", type=_date, required=True)
    p.add_argument("--end", type=_date, required=True, help="exclusive")
    p.add_argument("--per-day", type=int, default=300)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--corrupt-rate", type=float, default=0.0, help="fraction of lines to corrupt (tests, demos)")
    p.add_argument("--files-per-day", type=int, default=1)
    p.add_argument("--plain", action="store_true", help="write .jsonl instead of .jsonl.gz")
    p.add_argument("--drift", help="a drift profile, e.g. catalogue_launch (qat_tasks.synthetic.generator.PROFILES)")

    for name, help_ in (("refresh", "refresh calibration data for a window"),
                        ("run", "the whole quarterly run: refresh, champion, evaluation, INT8 challenger, 4-bit LLM")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--reason", required=True)
        p.add_argument("--start", type=_date)
        p.add_argument("--end", type=_date)
        p.add_argument("--models", nargs="*")
        p.add_argument("--run-id", help="reuse to resume an interrupted run (default: a new id)")

    p = sub.add_parser("import-labels", help="write a labelling tool's export (CSV or JSONL) as review labels")
    p.add_argument("file", help="CSV with a header, or JSONL: request_id, reviewed_label, reviewer, reviewed_at")
    p.add_argument("--out", help="traffic store to write to (default: serving.log_dir, else traffic.source)")

    p = sub.add_parser("serve", help="the HTTP service: @champion answers, @shadow is mirrored in the background")
    p.add_argument("--model", required=True)
    p.add_argument("--host")
    p.add_argument("--port", type=int)
    p.add_argument("--no-mirror", action="store_true", help="start with mirroring off")

    for name, help_ in (("shadow-review", "review @shadow against @champion on mirrored traffic, then act"),
                        ("promote", "move @champion to a reviewed version (default @shadow), keeping @previous"),
                        ("rollback", "restore @previous as @champion")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("--model", required=True)
        p.add_argument("--reason", required=True)
        if name == "promote":
            p.add_argument("--version", help="registered version (default: the one behind @shadow)")
        if name == "shadow-review":
            p.add_argument("--replay", action="store_true", help="replay logged traffic of --start..--end instead "
                                                                 "of reading the service's live logs")
            p.add_argument("--start", type=_date)
            p.add_argument("--end", type=_date)

    p = sub.add_parser("drift-check", help="the drift monitor once: recent traffic against calibration statistics")
    p.add_argument("--end", type=_date, help="day after the window (default: today, UTC)")
    p.add_argument("--days", type=int, help="window length (default: drift.window_days)")
    p.add_argument("--reason", default="manual drift check")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "validate-config":
            bad = 0
            for path in args.paths:
                try:
                    cfg = load_config(path)
                    print(f"ok    {path} (profile {cfg.profile}, {len(cfg.models)} models)")
                except ConfigError as exc:
                    bad += 1
                    print(f"error {exc}", file=sys.stderr)
            return 1 if bad else 0
        if args.command == "generate-traffic":
            from qat_tasks.synthetic.generator import generate

            stats = generate(args.out, args.start, args.end, args.per_day, seed=args.seed, compress=not args.plain,
                             corrupt_rate=args.corrupt_rate, files_per_day=args.files_per_day, progress=True,
                             drift=args.drift)
            print(json.dumps(dict(sorted(stats.items())), indent=1))
            return 0
        cfg = load_config(args.config)
        if args.command == "import-labels":
            from qat_tasks.data.labels import import_labels

            result = import_labels(args.file, args.out or cfg.serving_log_dir, cfg.traffic.s3_endpoint_url)
            print(json.dumps(result, indent=1))
            return 1 if result["invalid"] and not result["written"] else 0
        if args.command == "serve":
            from qat_tasks.serving.app import serve

            serve(cfg, args.model, host=args.host, port=args.port, mirror=not args.no_mirror)
            return 0
        if args.command in ("shadow-review", "promote", "rollback", "drift-check"):
            return _operate(args, cfg)
        from qat_tasks import pipeline

        run = _plan(args, cfg)
        calibration = pipeline.refresh_stage(cfg, run)
        print(json.dumps(calibration, indent=1))
        if args.command == "run":
            evaluations, decisions = [], []
            for name in pipeline.tracked_models(cfg, run):
                champion = pipeline.champion_stage(cfg, run, calibration, name)
                evaluations.append(pipeline.evaluate_stage(cfg, run, calibration, champion))
                decisions.append(pipeline.challenger_stage(cfg, run, calibration, champion))
            llm_decisions = [pipeline.llm_stage(cfg, run, calibration, name) for name in pipeline.llm_models(cfg, run)]
            print(json.dumps(pipeline.report_stage(cfg, run, calibration, evaluations, decisions, llm_decisions),
                             indent=1))
        return 0
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError) as exc:  # PromotionError is a RuntimeError
        print(f"qat-tasks: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
