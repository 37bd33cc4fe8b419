"""The console line of a metrics record, for people: rates with k/M, MFU in %, memory, ETA as h:mm:ss.

The JSONL metrics keep every number in full; this is only what a person watching a run reads.
"""

from __future__ import annotations

import math

# keys shown in their own words first, in this order; keys left out are per-device or per-rank copies
LEAD = ("loss", "lr", "grad_norm")
HIDDEN = {"step", "rank_loss", "tokens_per_s_per_device", "samples_per_s_per_device", "eta_s", "memory_gib"}
HIDDEN |= {"tokens_per_s", "samples_per_s", "mfu"}
MAX_EXTRA = 3  # an app's own keys shown, in the order it passes them to `Monitor.end_step`


def duration(seconds: float) -> str:
    """h:mm:ss (hours unbounded); `-` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "-"
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def count(value: float) -> str:
    """950, 12.3k, 4.56M, 7.89G: three significant digits."""
    for factor, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g}{suffix}"
    return f"{value:.3g}"


def short(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def console_line(record: dict, total_steps: int) -> str:
    """`step 100/300 | loss 2.031 | lr 0.003 | grad_norm 0.21 | 12.3k tok/s | MFU 3.1% | mem 1.2 GiB | ETA
    0:01:23 | a=... b=... c=... (+4 in metrics/raw)`: at most `MAX_EXTRA` of the app's own keys."""
    parts = [f"step {record['step']}/{total_steps}"]
    parts += [f"{key} {short(record[key])}" for key in LEAD if key in record]
    if "tokens_per_s" in record:
        parts.append(f"{count(record['tokens_per_s'])} tok/s")
    if "samples_per_s" in record:
        parts.append(f"{count(record['samples_per_s'])} samples/s")
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.3g}%")
    if "memory_gib" in record:
        parts.append(f"mem {record['memory_gib']:.3g} GiB")
    if "eta_s" in record:
        parts.append(f"ETA {duration(record['eta_s'])}")
    rest = [f"{k}={short(v)}" for k, v in record.items() if k not in HIDDEN and k not in LEAD]
    if len(rest) > MAX_EXTRA:  # one line a person can read: the app's first few, the rest in the file
        rest = rest[:MAX_EXTRA] + [f"(+{len(rest) - MAX_EXTRA} in metrics/raw)"]
    return " | ".join(parts + ([" ".join(rest)] if rest else []))


def summary_line(first_step: int, last_step: int, tokens: int, seconds: float, mfu: float) -> str:
    """The run's last line: what this process trained, how long it took, how fast on average."""
    rate = tokens / max(seconds, 1e-9)
    mfu_text = f", mean MFU {100 * mfu:.3g}%" if math.isfinite(mfu) else ""
    return (
        f"done: steps {first_step}->{last_step} ({last_step - first_step} this run), {count(tokens)} tokens, "
        f"wall {duration(seconds)}, mean {count(rate)} tok/s{mfu_text}"
    )
