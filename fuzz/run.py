"""Runs the coverage-guided fuzz targets (fuzz/targets.py) under atheris and reports inputs, failures, crashes and hangs.

    python fuzz/run.py [--target NAME|all] [--seconds N | --runs N] [--timeout S] [--workdir DIR]
    python fuzz/run.py --live [--seconds N]      (fuzz/live.py: a real PostgreSQL and pgrelay)

Each target runs in a worker process of its own (libFuzzer owns the process and exits it when its
budget is spent). The worker catches every exception a target lets out, records each distinct one
(type and the innermost pgrelay frame) with the input that caused it, and fuzzing goes on. A per-input
time limit (libFuzzer -timeout) catches hangs; the worker is then restarted for what is left of
its budget. Inputs tried are libFuzzer's own count ("Done N runs"), summed over restarts.
Exit status: 0 when no target failed, crashed or hung, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
INSTRUMENTED = ("pgrelay.auth", "pgrelay.client", "pgrelay.config", "pgrelay.keys", "pgrelay.prepared",
                "pgrelay.protocol", "pgrelay.proxy_protocol", "pgrelay.server", "pgrelay.session_state")
_DONE = re.compile(rb"Done (\d+) runs in")
_STAT = re.compile(rb"#(\d+)\s+(?:pulse|NEW|REDUCE|INITED|DONE|RELOAD)")


def _failure_key(exc: BaseException) -> tuple[str, str]:
    """(exception type, innermost frame in pgrelay or fuzz/targets.py as file:line)."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = frames[-1] if frames else None
    for frame in reversed(frames):
        if "/pgrelay/" in frame.filename or frame.filename.endswith("targets.py"):
            where = frame
            break
    loc = f"{os.path.relpath(where.filename, ROOT)}:{where.lineno}" if where else "?"
    return type(exc).__name__, loc


def worker(name: str, runs: int | None, seconds: float | None, timeout: float, out: str) -> None:
    """One target under libFuzzer; never returns (libFuzzer exits the process)."""
    import importlib

    import atheris
    sys.path.insert(0, ROOT)
    with atheris.instrument_imports(include=["pgrelay"]):  # coverage feedback from pgrelay's modules
        for module in INSTRUMENTED:
            importlib.import_module(module)
    from fuzz import targets

    fn = targets.TARGETS[name]
    corpus = os.path.join(out, "corpus")
    os.makedirs(corpus, exist_ok=True)
    for i, seed in enumerate(targets.SEEDS.get(name, [])):
        with open(os.path.join(corpus, f"seed{i}"), "wb") as f:
            f.write(seed)
    seen: set = set()
    failures_path = os.path.join(out, "failures.jsonl")
    if os.path.exists(failures_path):
        with open(failures_path) as f:
            for line in f:
                seen.add(tuple(json.loads(line)["key"]))
    counts = {"failing_inputs": 0}

    def one_input(data: bytes) -> None:
        try:
            fn(data)
        except Exception as exc:  # every exception a target lets out is a failure
            counts["failing_inputs"] += 1
            with open(os.path.join(out, "failing_inputs"), "w") as f:
                f.write(str(counts["failing_inputs"]))
            key = _failure_key(exc)
            if key not in seen:
                seen.add(key)
                with open(failures_path, "a") as f:
                    f.write(json.dumps({"key": key, "message": str(exc)[:300], "input": data[:4096].hex(),
                                        "traceback": traceback.format_exc()[-3000:]}) + "\n")

    argv = [sys.argv[0], corpus, f"-timeout={max(1, int(timeout))}", "-rss_limit_mb=2048", "-max_len=4096",
            f"-artifact_prefix={out}/", "-print_final_stats=1"]
    if runs is not None:
        argv.append(f"-runs={runs}")
    if seconds is not None:
        argv.append(f"-max_total_time={max(1, int(seconds))}")
    for seed in targets.SEEDS.get(name, []):  # builds the target's Relay etc. now: slow, and no input's time
        one_input(seed)
    atheris.Setup(argv, one_input)
    atheris.Fuzz()


def run_target(name: str, runs: int | None, seconds: float | None, timeout: float, workdir: str) -> dict:
    """Run a target's worker (restarting it after a hang or crash) until its budget is spent."""
    out = os.path.join(workdir, name)
    os.makedirs(out, exist_ok=True)
    result = {"target": name, "inputs": 0, "hangs": 0, "process_crashes": 0, "seconds": 0.0}
    start = time.monotonic()
    left_runs = runs
    while True:
        left_secs = None if seconds is None else seconds - (time.monotonic() - start)
        if left_secs is not None and left_secs < 1 or left_runs is not None and left_runs <= 0:
            break
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", name, "--workdir", workdir,
               "--timeout", str(timeout)]
        cmd += ["--runs", str(left_runs)] if left_runs is not None else []
        cmd += ["--seconds", str(int(left_secs))] if left_secs is not None else []
        with open(os.path.join(out, "worker.log"), "ab") as log:
            proc = subprocess.run(cmd, stdout=log, stderr=subprocess.PIPE, cwd=ROOT, check=False)
            log.write(proc.stderr)
        err = proc.stderr
        done = _DONE.findall(err)
        if done:
            n = int(done[-1])
        else:  # killed before its final line: its last status line is the best count there is
            stats = _STAT.findall(err)
            n = int(stats[-1]) if stats else 0
        result["inputs"] += n
        if left_runs is not None:
            left_runs -= max(n, 1)
        if b"libFuzzer: timeout" in err:
            result["hangs"] += 1
        elif proc.returncode != 0:
            result["process_crashes"] += 1
            if result["process_crashes"] > 5:
                break
        elif done:
            break  # budget spent
    result["seconds"] = round(time.monotonic() - start, 1)
    failures = []
    path = os.path.join(out, "failures.jsonl")
    if os.path.exists(path):
        with open(path) as f:
            failures = [json.loads(line) for line in f]
    result["failures"] = [{"type": f["key"][0], "where": f["key"][1], "message": f["message"]} for f in failures]
    failing = os.path.join(out, "failing_inputs")
    result["failing_inputs"] = int(open(failing).read()) if os.path.exists(failing) else 0
    result["crashes"] = result["failing_inputs"] + result["process_crashes"]
    return result


def report(results: list[dict], workdir: str) -> str:
    lines = [f"{'target':<14}{'inputs':>12}{'seconds':>9}{'failures':>10}{'crashes':>9}{'hangs':>7}"]
    for r in results:
        lines.append(f"{r['target']:<14}{r['inputs']:>12}{r['seconds']:>9}{len(r['failures']):>10}"
                     f"{r['crashes']:>9}{r['hangs']:>7}")
    lines.append(f"{'total':<14}{sum(r['inputs'] for r in results):>12}"
                 f"{round(sum(r['seconds'] for r in results), 1):>9}{sum(len(r['failures']) for r in results):>10}"
                 f"{sum(r['crashes'] for r in results):>9}{sum(r['hangs'] for r in results):>7}")
    for r in results:
        for f in r["failures"]:
            lines.append(f"FAILURE {r['target']}: {f['type']} at {f['where']}: {f['message'][:160]}")
    lines.append(f"inputs, corpora and failing inputs (failures.jsonl, timeout-*/crash-*): {workdir}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", default="all", help="a target name from fuzz/targets.py, or all")
    budget = parser.add_mutually_exclusive_group()
    budget.add_argument("--seconds", type=float, help="time per target (default 10)")
    budget.add_argument("--runs", type=int, help="inputs per target")
    parser.add_argument("--timeout", type=float, default=5, help="per-input time limit: longer is a hang")
    parser.add_argument("--workdir", help="where corpora and failures go (default: a new temporary directory)")
    parser.add_argument("--json", help="also write the results as JSON to this file")
    parser.add_argument("--live", action="store_true", help="fuzz a live pgrelay (fuzz/live.py) instead")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.live:
        sys.path.insert(0, ROOT)
        from fuzz import live
        return live.main(["--seconds", str(args.seconds or 60)])
    if args.seconds is None and args.runs is None:
        args.seconds = 10
    workdir = args.workdir or tempfile.mkdtemp(prefix="pgrelay-fuzz-")
    if args.worker:
        worker(args.worker, args.runs, args.seconds, args.timeout, os.path.join(workdir, args.worker))
        return 0
    sys.path.insert(0, ROOT)
    from fuzz.targets import TARGETS
    names = list(TARGETS) if args.target == "all" else [args.target]
    unknown = [n for n in names if n not in TARGETS]
    if unknown:
        parser.error(f"unknown target {unknown[0]!r}; targets: {', '.join(TARGETS)}")
    results = []
    for name in names:
        results.append(run_target(name, args.runs, args.seconds, args.timeout, workdir))
        print(report(results[-1:], workdir).splitlines()[1], flush=True)
    print(report(results, workdir))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    bad = any(r["crashes"] or r["hangs"] or r["failures"] or not r["inputs"] for r in results)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
