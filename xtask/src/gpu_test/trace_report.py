#!/usr/bin/env python3
"""Summarises a block timeline written by RVLLM_TRACE_BLOCKS (engine/src/backend/cuda/
block_trace.rs): groups the block records into kernel launches and prints, for the last
launches, when their blocks started, passed their PDL wait, saw their first input and ended,
and per kernel kind the mean time from the previous launch's end to this one's end (the
step's critical path), split into waiting for the previous kernel, the prologue up to the
first input, and the spread of the blocks' ends.

Usage: trace_report.py TRACE.bin[.gz] [LAST_LAUNCHES]   (plain Python 3, no packages)"""
import gzip
import struct
import sys

NAMES = {1: "attention", 2: "reduce", 16: "gemv", 17: "gemv_add", 18: "gemv_silu",
         19: "gemv_silu_add", 20: "gemv_norm"}


def records(path):
    raw = (gzip.open if path.endswith(".gz") else open)(path, "rb").read()
    words = len(raw) // 8
    w = struct.unpack("<%dQ" % words, raw[: words * 8])
    for i in range(8, words - 7, 8):
        start, waited, first, end, meta = w[i : i + 5]
        if end:
            yield start, waited, first, end, meta & 0xFF, meta >> 16


def launches(recs):
    """Blocks of one kernel kind belong to one launch until a block index repeats."""
    out, current = [], {}
    for r in sorted(recs):
        tag, block = r[4], r[5]
        cur = current.get(tag)
        if cur is None or block in cur["blocks"]:
            cur = {"tag": tag, "recs": [], "blocks": set()}
            out.append(cur)
            current[tag] = cur
        cur["recs"].append(r)
        cur["blocks"].add(block)
    for launch in out:
        rs = launch["recs"]
        launch["start"] = min(r[0] for r in rs)
        launch["wait"] = min((r[1] for r in rs if r[1]), default=0)
        launch["first"] = min((r[2] for r in rs if r[2]), default=0)
        launch["end0"] = min(r[3] for r in rs)
        launch["end"] = max(r[3] for r in rs)
    out.sort(key=lambda l: l["end"])
    return out


def main():
    path = sys.argv[1]
    last = int(sys.argv[2]) if len(sys.argv) > 2 else 14
    ls = launches(records(path))
    if not ls:
        sys.exit(f"{path}: no block records")
    t0 = ls[-last]["start"] if len(ls) >= last else ls[0]["start"]
    us = lambda t: (t - t0) / 1000.0 if t else float("nan")
    print(f"{'kernel':14} {'blocks':>6} {'start':>9} {'waited':>9} {'first in':>9} {'end':>9}  (us)")
    for l in ls[-last:]:
        print(f"{NAMES.get(l['tag'], l['tag']):14} {len(l['recs']):6} {us(l['start']):9.2f} "
              f"{us(l['wait']):9.2f} {us(l['first']):9.2f} {us(l['end']):9.2f}")
    kinds = {}
    for prev, l in zip(ls, ls[1:]):
        span = l["end"] - prev["end"]
        if span <= 0 or span > 1_000_000:  # a gap between steps, not one step's chain
            continue
        k = kinds.setdefault(NAMES.get(l["tag"], l["tag"]), [0, 0.0, 0.0, 0.0, 0.0])
        k[0] += 1
        k[1] += span
        k[2] += (l["wait"] - prev["end"]) if l["wait"] else 0
        k[3] += (l["first"] - l["wait"]) if l["first"] and l["wait"] else 0
        k[4] += l["end"] - l["end0"]
    print("\nper kind (means, us): after the previous end until this end | of which waiting"
          " for it | wait to first input | spread of the blocks' ends")
    for name, (n, span, wait, first, spread) in sorted(kinds.items(), key=lambda kv: -kv[1][1]):
        print(f"{name:14} x{n:<5} {span / n / 1e3:8.2f} | {wait / n / 1e3:6.2f} | "
              f"{first / n / 1e3:6.2f} | {spread / n / 1e3:6.2f}")


if __name__ == "__main__":
    main()
