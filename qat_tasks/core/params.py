"""Run parameters, validated once for every DAG and the CLI: the reason a run happens, the models it covers and
the traffic window it reads. A parameter that cannot be honoured raises ParamError naming it."""

from __future__ import annotations

from datetime import UTC, date, datetime

# Longest traffic windows: a recalibration reads at most about a year of logs; a drift check compares at most a
# quarter of recent traffic with the calibration-time reference.
MAX_RECALIBRATION_DAYS = 400
MAX_DRIFT_DAYS = 92
MIN_REASON_CHARS = 3
MAX_REASON_CHARS = 500  # the DAGs' `reason` Param takes at most this many characters


class ParamError(ValueError):
    """A run parameter that cannot be honoured; the message names it."""


def reason_of(params: dict) -> str:
    reason = str(params.get("reason") or "").strip()
    if len(reason) < MIN_REASON_CHARS:
        raise ParamError(f"params.reason: say why this run happens (at least {MIN_REASON_CHARS} characters)")
    return reason


def models_of(params: dict, known: list[str], what: str) -> list[str]:
    """The models a run covers: params.models, else every one of `known` (`what` names that list)."""
    wanted = list(params.get("models") or known)
    unknown = [m for m in wanted if m not in known]
    if unknown:
        raise ParamError(f"params.models: unknown model(s) {unknown}, not {what}: {known}")
    return wanted


def explicit_window(params: dict) -> tuple[date, date] | None:
    """params.window_start / window_end as dates, or None when neither is given."""
    start_s, end_s = params.get("window_start"), params.get("window_end")
    if bool(start_s) != bool(end_s):
        raise ParamError("params.window_start and params.window_end go together: give both or neither")
    if not start_s:
        return None
    try:
        return date.fromisoformat(start_s), date.fromisoformat(end_s)
    except ValueError as exc:
        raise ParamError(f"params.window_start/window_end: not an ISO date ({exc})") from None


def check_window(start: date, end: date, max_days: int, what: str) -> None:
    """A window [start, end) that ends after it starts, is at most `max_days` long and does not start in the future."""
    if end <= start:
        raise ParamError(f"{what}: end {end} must be after start {start}")
    if (end - start).days > max_days:
        raise ParamError(f"{what}: {(end - start).days} days is longer than {max_days}")
    if start > datetime.now(UTC).date():
        raise ParamError(f"{what}: starts in the future ({start})")


def reference_day(reference: datetime | date | None) -> date:
    """The day a run is planned for: its logical date, else today (UTC)."""
    return reference.date() if isinstance(reference, datetime) else (reference or datetime.now(UTC).date())


def previous_quarter(reference: date) -> tuple[date, date]:
    """[start, end) of the calendar quarter before the one holding `reference`."""
    q_start = date(reference.year, 3 * ((reference.month - 1) // 3) + 1, 1)
    prev_month = q_start.month - 3
    start = date(q_start.year - 1, prev_month + 12, 1) if prev_month < 1 else date(q_start.year, prev_month, 1)
    return start, q_start
