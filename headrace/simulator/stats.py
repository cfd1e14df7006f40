"""What the simulator saw: counters plus a bounded log of call records, served at GET /_sim/stats."""

from __future__ import annotations

from collections import Counter, defaultdict, deque
from dataclasses import asdict, dataclass
from typing import Any

MAX_RECORDS = 20_000
WINDOW_S = 60.0


@dataclass(frozen=True)
class CallRecord:
    t: float  # epoch seconds when the call was admitted (or refused)
    t_done: float  # epoch seconds when it was answered
    dialect: str
    model: str | None
    api_key: str
    status: int  # 499: the client went away before the answer
    outcome: str  # ok, rate_limited, fault, directive, invalid, client_closed, crash
    admitted: bool
    input_tokens: int
    output_tokens: int
    reserved_tokens: int  # output tokens reserved at admission (max_tokens, or the answer's length)
    attempt: str | None = None  # the caller's X-Headrace-Attempt header: which attempt this call was
    cache_read_tokens: int = 0  # of input_tokens, read from the prompt cache


class Stats:
    def __init__(self) -> None:
        self.received: Counter[str] = Counter()
        self.answered: defaultdict[str, Counter[int]] = defaultdict(Counter)
        self.outcomes: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.admitted: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self.not_found = 0
        self.records: deque[CallRecord] = deque(maxlen=MAX_RECORDS)
        self.records_total = 0

    def receive(self, dialect: str) -> None:
        self.received[dialect] += 1

    def admit(self, dialect: str, input_tokens: int, reserved_tokens: int) -> None:
        counts = self.admitted[dialect]
        counts["requests"] += 1
        counts["input_tokens"] += input_tokens
        counts["reserved_tokens"] += reserved_tokens

    def finish(self, record: CallRecord) -> None:
        self.answered[record.dialect][record.status] += 1
        self.outcomes[record.dialect][record.outcome] += 1
        if record.admitted:
            self.admitted[record.dialect]["output_tokens"] += record.output_tokens
        self.records.append(record)
        self.records_total += 1

    def snapshot(self, record_limit: int | None = None) -> dict[str, Any]:
        records = list(self.records)
        shown = records
        if record_limit is not None:
            shown = records[-record_limit:] if record_limit > 0 else []
        dialects = sorted(set(self.received) | set(self.answered))
        return {
            "received": dict(self.received),
            "answered": {d: {str(s): n for s, n in sorted(self.answered[d].items())} for d in dialects},
            "in_flight": {d: self.received[d] - sum(self.answered[d].values()) for d in dialects},
            "outcomes": {d: dict(self.outcomes[d]) for d in dialects},
            "admitted": {d: _admitted_counts(self.admitted[d]) for d in dialects},
            "not_found": self.not_found,
            "peak_60s": peak_windows(records),
            "per_second": per_second(records),
            "records_total": self.records_total,
            "records_dropped": self.records_total - len(records),
            "records": [asdict(r) for r in shown],
        }


def _admitted_counts(counts: Counter[str]) -> dict[str, int]:
    keys = ("requests", "input_tokens", "output_tokens", "reserved_tokens")
    return {key: counts[key] for key in keys}


def per_second(records: list[CallRecord]) -> list[dict[str, Any]]:
    """Admissions grouped by (whole epoch second of admission, dialect, model)."""
    groups: defaultdict[tuple[int, str, str | None], Counter[str]] = defaultdict(Counter)
    for record in records:
        if record.admitted:
            group = groups[(int(record.t), record.dialect, record.model)]
            group["requests"] += 1
            group["input_tokens"] += record.input_tokens
            group["output_tokens"] += record.output_tokens
    return [
        {"second": second, "dialect": dialect, "model": model, **counts}
        for (second, dialect, model), counts in sorted(groups.items(), key=lambda item: str(item[0]))
    ]


def peak_windows(records: list[CallRecord]) -> list[dict[str, Any]]:
    """Per (dialect, api key, model): the most admitted in any 60 s window of admission times.

    A continuous bucket allows up to 2x its per-minute limit in one window (full bucket + refill).
    """
    by_scope: defaultdict[tuple[str, str, str | None], list[CallRecord]] = defaultdict(list)
    for record in records:
        if record.admitted:
            by_scope[(record.dialect, record.api_key, record.model)].append(record)
    peaks = []
    for (dialect, api_key, model), scoped in sorted(by_scope.items(), key=lambda item: str(item[0])):
        scoped.sort(key=lambda r: r.t)
        best: Counter[str] = Counter()
        window: Counter[str] = Counter()
        start = 0
        for record in scoped:
            window.update(_amounts(record))
            while scoped[start].t <= record.t - WINDOW_S:
                window.subtract(_amounts(scoped[start]))
                start += 1
            for key, value in window.items():
                best[key] = max(best[key], value)
        peaks.append({"dialect": dialect, "api_key": api_key, "model": model, **best})
    return peaks


def _amounts(record: CallRecord) -> dict[str, int]:
    return {
        "requests": 1,
        "input_tokens": record.input_tokens,
        "output_tokens": record.output_tokens,
        "total_tokens": record.input_tokens + record.output_tokens,
    }
