#!/usr/bin/env python3
"""Serve configurations of mobiserve one at a time, in alternating rounds, and load each with the
peers' load generator (../shared/peers/loadgen.py) at c=1 and c=32: the pairs in
docs/performance.md. Alternating rounds put the machine's drift on every configuration alike;
compare only figures of one run. Each row also says how the load's connections landed on the
server's workers (the kernel spreads connections, not calls).

    scripts/compare-configs.py OUT.json "defaults=" "workers1=--workers 1" --rounds 3 --duration 15 --procs 2
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SHARED = HERE.parent.parent / "shared"
BIN = Path(sys.executable).parent  # run it with the project's venv: .venv/bin/python scripts/compare-configs.py


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def children(pid: int) -> list[int]:
    kids: list[int] = []
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            kids += [int(x) for x in Path(f"/proc/{pid}/task/{task}/children").read_text().split()]
        except OSError:
            pass
    return kids


def connections_per_process(port: int, pids: list[int]) -> list[int]:
    """Established connections to `port` held by each of `pids`, most first."""
    owner = {}
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    held: Counter[int] = Counter()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
            if local_port == port and state == "01" and inode in owner:
                held[owner[inode]] += 1
    return sorted(held.values(), reverse=True)


def serve(args: str, port: int) -> subprocess.Popen[str]:
    cmd = [
        str(BIN / "mobiserve"), "serve", "--model", str(SHARED / "models/mobilenetv2-12-int8.onnx"),
        "--port", str(port), *shlex.split(args),
    ]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stderr or ()), daemon=True).start()
    deadline = time.monotonic() + 120
    while not any("event=serving" in line for line in lines):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise SystemExit("the server did not start:\n" + "".join(lines[-10:]))
        time.sleep(0.1)
    return server


def load(port: int, concurrency: int, duration: float, server_pid: int, procs: int, out: Path) -> dict[str, Any]:
    report = out.with_suffix(f".{port}-{concurrency}.json")
    cmd = [
        str(BIN / "python"), str(SHARED / "peers/loadgen.py"), "--port", str(port), "--proto", "mobiserve",
        "--concurrency", str(concurrency), "--duration", str(duration), "--warmup", "3", "--wait-ready", "60",
        "--server-pid", str(server_pid), "--json", str(report),
    ]  # fmt: skip
    if procs:
        cmd += ["--procs", str(procs)]
    generator = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(4)  # inside the warm-up: the connections are open
    conns = connections_per_process(port, children(server_pid) or [server_pid])
    output = generator.communicate()[0]
    if generator.returncode:
        raise SystemExit(f"the load generator failed:\n{output}")
    result: dict[str, Any] = json.loads(report.read_text())
    report.unlink()
    result["conns"] = conns
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="where to write the rows (JSON)")
    parser.add_argument("configs", nargs="+", metavar="LABEL=ARGS", help="a label and `mobiserve serve` flags")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=15, help="seconds measured at c=32")
    parser.add_argument("--c1", type=float, default=8, help="seconds measured at c=1 (0: skip)")
    parser.add_argument("--procs", type=int, default=2, help="load processes at c=32, one connection each")
    args = parser.parse_args()
    rows = []
    for round_ in range(args.rounds):
        configs = args.configs if round_ % 2 == 0 else list(reversed(args.configs))
        for spec in configs:
            label, _, flags = spec.partition("=")
            port = free_port()
            server = serve(flags, port)
            try:
                c1 = load(port, 1, args.c1, server.pid, 0, args.out) if args.c1 else None
                c32 = load(port, 32, args.duration, server.pid, args.procs, args.out)
            finally:
                os.killpg(server.pid, 15)
                server.wait(60)
            ok = max(1, c32["n_ok"])
            row = {
                "round": round_, "label": label, "args": flags,
                "c1_p50_ms": c1 and round(c1["p50_ms"], 2),
                "c32_img_s": round(c32["img_s"], 1), "c32_p50_ms": round(c32["p50_ms"], 1),
                "c32_p99_ms": round(c32["p99_ms"], 1),
                "server_cpu_ms_per_image": round(c32["server_cpu_s"] / ok * 1000, 2),
                "other_cpu_s": round(c32.get("other_cpu_s", 0), 1),
                "conns": c32["conns"], "errors": c32["n_errors"],
            }  # fmt: skip
            print(json.dumps(row), flush=True)
            rows.append(row)
    args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
