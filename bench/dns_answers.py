"""The Agent's DNS answers for names (ztna.names.answer), in process: answers per second.

    python bench/dns_answers.py [--names 20000] [--json bench/results/dns_answers.json]

Each query is a distinct name under one wildcard pattern, so every answer binds a new
synthetic address (the worst case: a refresh of a bound name costs less). Timing only,
no assertion: the number is recorded in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import time

import dns.message

from ztna.names.answer import NameTable
from ztna.names.patterns import parse_patterns
from ztna.names.pool import DEFAULT_POOL_V4, DEFAULT_POOL_V6, SyntheticPool


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=20000)
    ap.add_argument("--json")
    args = ap.parse_args()
    table = NameTable({"corp": parse_patterns(["*.corp.test"])},
                      [SyntheticPool(DEFAULT_POOL_V4, ttl=30), SyntheticPool(DEFAULT_POOL_V6, ttl=30)])
    queries = [dns.message.make_query(f"a{i}.corp.test", "A").to_wire() for i in range(args.names)]
    t0 = time.perf_counter()
    for i, q in enumerate(queries):
        table.answer(q, now=i * 1e-4)
    seconds = time.perf_counter() - t0
    result = {"names": args.names, "answers_per_second": round(args.names / seconds),
              "us_per_answer": round(seconds / args.names * 1e6, 1)}
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh)


if __name__ == "__main__":
    main()
