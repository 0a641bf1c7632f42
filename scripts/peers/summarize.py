#!/usr/bin/env python3
"""Markdown table of a scripts/peers/bench.sh run (stdlib only).

    summarize.py RESULTS_DIR

Reads RESULTS_DIR/manifest.tsv, the peers' `llama-bench -o json` files and our `bitnet bench`
outputs (markdown table, or --json where the build has it). Every cell is the median ± half
the range of the timed repetitions in tokens/s; each peer row is followed by the run of ours
made right after it, whose last column is ours ÷ that peer, test by test.
"""
import csv
import json
import os
import re
import statistics
import sys

TEST = re.compile(r"^(pp|tg)\d+$")


def spread(samples):
    s = sorted(samples)
    return statistics.median(s), (s[-1] - s[0]) / 2


def peer_tests(path):
    """{test: (median, half range)} from a llama-bench JSON array."""
    with open(path) as f:
        text = f.read()
    # Old llama-bench builds may print log lines before the array.
    runs = json.loads(text[text.index("["):])
    out = {}
    for r in runs:
        npp, ntg = int(r.get("n_prompt", 0)), int(r.get("n_gen", 0))
        if npp and ntg:
            continue  # pp+tg combined tests are not compared
        name = f"pp{npp}" if npp else f"tg{ntg}"
        samples = r.get("samples_ts") or [r["avg_ts"]]
        out[name] = spread([float(x) for x in samples])
    return out


def ours_json(obj, out):
    """Best effort over a --json output: any object naming a ppN/tgN test."""
    if isinstance(obj, list):
        for o in obj:
            ours_json(o, out)
        return
    if not isinstance(obj, dict):
        return
    name = next((v for v in obj.values() if isinstance(v, str) and TEST.match(v)), None)
    if name:
        samples = next(
            (obj[k] for k in ("samples_ts", "samples", "rates", "tokens_per_s", "ts") if isinstance(obj.get(k), list)),
            None,
        )
        if samples:
            out[name] = spread([float(x) for x in samples])
        elif "median" in obj:
            out[name] = (float(obj["median"]), float(obj.get("half_range", obj.get("spread", 0.0))))
    for v in obj.values():
        if isinstance(v, (dict, list)):
            ours_json(v, out)


def ours_tests(path):
    with open(path) as f:
        text = f.read()
    out = {}
    try:
        ours_json(json.loads(text), out)
        if out:
            return out
    except ValueError:
        pass
    # | model | size | params | backend | head | threads | test | t/s | eff. GB/s |
    # (older builds: no head / GB/s columns): the t/s cell follows the test cell.
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        for test, rate in zip(cells, cells[1:]):
            m = re.match(r"([\d.]+)\s*±\s*([\d.]+)", rate)
            if TEST.match(test) and m:
                out[test] = (float(m.group(1)), float(m.group(2)))
    return out


def human(n):
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024


def dir_bytes(d):
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))


def cell(v):
    return f"{v[0]:.2f} ± {v[1]:.2f}" if v else "—"


def main():
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    res = sys.argv[1]
    with open(os.path.join(res, "manifest.tsv")) as f:
        rows = list(csv.DictReader(f, delimiter="\t"))
    models = os.path.dirname(rows[0]["model"]) if rows else ""
    synth = os.path.join(models, "synth-2b4t")
    ours_size = human(dir_bytes(synth)) if os.path.isdir(synth) else "?"

    table = []
    tests = set()
    for r in rows:
        peer = peer_tests(os.path.join(res, r["peer_json"])) if r["peer_json"] else {}
        ours = {}
        for f in filter(None, r["ours_files"].split(",")):
            p = os.path.join(res, f)
            if os.path.exists(p):
                ours.update(ours_tests(p))
        tests |= set(peer) | set(ours)
        table.append((r, peer, ours))

    order = sorted(tests, key=lambda t: (t[:2] != "pp", int(t[2:])))
    head = ["engine", "weights + head", "file size", "threads"] + [f"{t} t/s" for t in order]
    head.append("ours ÷ peer (" + " / ".join(order) + ")")
    print("| " + " | ".join(head) + " |")
    print("|" + "|".join([" --- "] * 2 + [" ---: "] * (len(head) - 2)) + "|")
    for r, peer, ours in table:
        size = human(os.path.getsize(r["model"])) if os.path.exists(r["model"]) else "?"
        print("| " + " | ".join([r["engine"], r["label"], size, r["threads"]] + [cell(peer.get(t)) for t in order] + [""]) + " |")
        ratios = " / ".join(
            f"{ours[t][0] / peer[t][0]:.2f}" if t in ours and t in peer and peer[t][0] > 0 else "—" for t in order
        )
        heads = {"exact": "BF16 head (--head exact)", "q8": "int8 head (--head q8)", "q4": "4-bit head (--head q4)"}
        our_label = "ternary U8 + " + heads.get(r["head"], r["head"])
        print("| " + " | ".join(["ours", our_label, ours_size, r["threads"]] + [cell(ours.get(t)) for t in order] + [ratios]) + " |")
    meta = os.path.join(res, "meta.txt")
    if os.path.exists(meta):
        print()
        with open(meta) as f:
            for line in f:
                print("    " + line.rstrip())


if __name__ == "__main__":
    main()
