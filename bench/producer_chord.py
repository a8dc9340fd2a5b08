"""Producer benchmark (issue 14): `mediafarm submit --workflow` sending a chord of N no-op
headers onto RabbitMQ with no worker running, for several `mediafarm` binaries in alternating
runs: wall time, the producer's CPU (its rusage) and RabbitMQ's CPU (`beam.smp` from /proc,
10 ms ticks, read 0.2 s after the producer exits so its last confirms are counted). The queue
is purged before every run and deleted at the end. 127.0.0.1 only.

    .venv/bin/python bench/producer_chord.py --runs 10 main=var/bin/main/mediafarm new=target/release/mediafarm
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import time

from bench_common import cpu_of, delete_queue, pid_of

BROKER = "amqp://guest:guest@127.0.0.1:5672//"
BACKEND = os.environ.get("BENCH_RESULT_BACKEND", "redis://127.0.0.1:6379/15")
QUEUE = "bench-producer-chord"


def purge():
    subprocess.run(["rabbitmqctl", "purge_queue", QUEUE],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("binaries", nargs="+", metavar="LABEL=PATH")
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--chord-size", type=int, default=1000)
    args = parser.parse_args()
    sig = lambda **kw: {"task": "echo.step", "kwargs": kw, "options": {"queue": QUEUE}}
    workflow = json.dumps({"chord": {"header": [sig(i=k) for k in range(args.chord_size)],
                                     "body": sig(body=True)}})
    env = {**os.environ, "MEDIAFARM_RESULT_BACKEND": BACKEND}
    env.pop("MEDIAFARM_BROKER_URL", None)
    beam = pid_of("beam.smp")
    results = {}
    for _ in range(args.runs):
        for spec in args.binaries:
            label, _, path = spec.partition("=")
            purge()
            time.sleep(0.3)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            broker_before = cpu_of(beam, descendants=False)
            began = time.time()
            subprocess.run([path, "submit", "--workflow", "-"], input=workflow, text=True,
                           env=env, stdout=subprocess.DEVNULL, check=True)
            wall = time.time() - began
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            time.sleep(0.2)
            own = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
            results.setdefault(label, []).append((wall, own, cpu_of(beam, descendants=False) - broker_before))
    delete_queue(BROKER, QUEUE)
    print(f"chord of {args.chord_size} by `mediafarm submit --workflow`, no worker, "
          f"{args.runs} alternating runs each")
    print("| producer | wall s (median, range) | producer CPU s (median) | RabbitMQ CPU s (median) |")
    print("| --- | --- | ---: | ---: |")
    for label, runs in results.items():
        walls = [r[0] for r in runs]
        print(f"| {label} | {statistics.median(walls):.3f} ({min(walls):.3f}–{max(walls):.3f}) | "
              f"{statistics.median(r[1] for r in runs):.3f} | "
              f"{statistics.median(r[2] for r in runs):.3f} |")


if __name__ == "__main__":
    main()
