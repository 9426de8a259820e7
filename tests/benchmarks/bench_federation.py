"""Benchmark: a 20-SuperNode federation of real processes on one machine (memory per round, round time, idle cost).

Run by hand (nothing else running; ~15 min on 2 cores):

    python -m tests.benchmarks.bench_federation                  # 20 SuperNodes, 10 rounds, the recipe's 10%
    python -m tests.benchmarks.bench_federation --nodes 4 --rounds 3

One SuperLink with TLS and SuperNode authentication, N registered SuperNodes (one IID partition each, as
docs/deployment.md starts them), the tests' tiny Llama on the local alpaca sample, `flwr run` with
`strategy.fraction-train` (default 0.1: 2 of 20 train each round). Every second it samples the resident memory
(RSS) of the SuperLink, of its SuperExec and ServerApp, of each SuperNode process and of the ClientApp processes
under them, and their CPU time. Printed per round: the largest RSS of each, the round's wall time; then what an
idle SuperNode costs (RSS, CPU seconds per minute while its node trained nothing). Every process is stopped by PID.
"""

from __future__ import annotations

import argparse
import re
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import psutil

from tests.helpers import make_tiny_llama, shipped_tokenizer, tiny_overrides
from tests.processes import Federation

MB = 1024 * 1024
ROUND_LINE = re.compile(r"\[round (\d+)/\d+\] .*clients=(\d+) .*\| ([0-9.]+)s, ETA")


def tree(pid: int) -> list[psutil.Process]:
    """A process and its live descendants."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def rss_mb(proc: psutil.Process) -> float:
    """Resident set in MiB (0 for a process that is gone)."""
    try:
        return proc.memory_info().rss / MB
    except psutil.Error:
        return 0.0


def cpu_s(procs: list[psutil.Process]) -> float:
    """User + system CPU seconds of these processes."""
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
            total += t.user + t.system
        except psutil.Error:
            pass
    return total


def main() -> None:
    """Start the federation, run the rounds, sample memory every second, print the tables."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--nodes", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--fraction-train", type=float, default=0.1)
    parser.add_argument("--idle-s", type=float, default=60.0, help="idle window measured before the run")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = make_tiny_llama(root / "tiny", shipped_tokenizer(root / "tokenizer"))
        fed = Federation(root / "federation", max_nodes=args.nodes)
        try:
            started = time.monotonic()
            for key in range(args.nodes):
                fed.add_node(key, key, args.nodes)
            fed.wait_online(list(range(args.nodes)), timeout=600)
            print(f"{args.nodes} SuperNodes registered and online in {time.monotonic() - started:.0f} s", flush=True)

            nodes = {key: psutil.Process(proc.pid) for key, proc in fed.nodes.items()}
            time.sleep(5)
            before = {key: cpu_s(tree(p.pid)) for key, p in nodes.items()}
            time.sleep(args.idle_s)
            idle_cpu = [(cpu_s(tree(p.pid)) - before[key]) * 60 / args.idle_s for key, p in nodes.items()]
            idle_rss = [sum(rss_mb(p) for p in tree(proc.pid)) for proc in nodes.values()]
            superlink_idle = sum(rss_mb(p) for p in tree(fed.superlink.pid))

            log = root / "run.log"
            overrides = tiny_overrides(model, **{"num-server-rounds": args.rounds,
                                                 "strategy.fraction-train": args.fraction_train,
                                                 "train.output-dir": str(root / "results")})
            run = fed.run(overrides, log)
            samples: dict[int, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
            rounds: dict[int, tuple[int, float]] = {}
            current = 1
            while run.poll() is None:
                link = tree(fed.superlink.pid)
                samples[current]["superlink"].append(rss_mb(link[0]) if link else 0.0)
                samples[current]["serverapp"].append(sum(rss_mb(p) for p in link if "serverapp" in p.name()))
                samples[current]["superexec"].append(sum(rss_mb(p) for p in link if "superexe" in p.name()))
                for proc in nodes.values():
                    below = tree(proc.pid)[1:]
                    samples[current]["supernode"].append(rss_mb(proc))
                    samples[current]["node_superexec"].append(sum(rss_mb(p) for p in below if "superexe" in p.name()))
                    apps = [p for p in below if "clientapp" in p.name()]
                    if apps:
                        samples[current]["clientapp"].append(max(rss_mb(p) for p in apps))
                        samples[current]["clientapps_alive"].append(len(apps))
                for rnd, clients, secs in ROUND_LINE.findall(log.read_text()):
                    rounds[int(rnd)] = (int(clients), float(secs))
                current = max(rounds, default=0) + 1
                time.sleep(1.0)
            text = log.read_text()
            for rnd, clients, secs in ROUND_LINE.findall(text):
                rounds[int(rnd)] = (int(clients), float(secs))
            assert len(rounds) == args.rounds, text[-3000:]
            run_cpu = {key: cpu_s([p]) for key, p in nodes.items()}
        finally:
            fed.close()

    cpu = psutil.cpu_count()
    print(f"\n{args.nodes} SuperNodes, {args.rounds} rounds, fraction-train {args.fraction_train}, "
          f"{cpu} CPUs; RSS in MiB (largest sample of the round)\n")
    print("| round | clients | round s | SuperLink | SuperExec | ServerApp | SuperNode (max of N) | its SuperExec (max) "
          "| ClientApp (max) | ClientApps alive |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for rnd in sorted(rounds):
        s = samples.get(rnd, {})
        top = {k: max(v) if v else 0.0 for k, v in s.items()}
        print(f"| {rnd} | {rounds[rnd][0]} | {rounds[rnd][1]:.1f} | {top.get('superlink', 0):.0f} | "
              f"{top.get('superexec', 0):.0f} | {top.get('serverapp', 0):.0f} | {top.get('supernode', 0):.0f} | "
              f"{top.get('node_superexec', 0):.0f} | {top.get('clientapp', 0):.0f} | {top.get('clientapps_alive', 0):.0f} |")
    print(f"\nIdle SuperNode + its SuperExec (before the run, {args.idle_s:.0f} s): RSS median "
          f"{statistics.median(idle_rss):.0f} MiB "
          f"(max {max(idle_rss):.0f}), CPU {statistics.median(idle_cpu):.2f} s/min median "
          f"(max {max(idle_cpu):.2f}); SuperLink tree idle {superlink_idle:.0f} MiB")
    print(f"CPU seconds of each SuperNode process itself (without SuperExec and ClientApps), start to end: "
          f"median {statistics.median(run_cpu.values()):.1f}, max {max(run_cpu.values()):.1f}")


if __name__ == "__main__":
    main()
