"""Run the README's offline demo and offline evaluation exactly as written, on a fresh machine state.

    python -m tests.benchmarks.readme_demo [--keep]

The two ```bash blocks after "**Offline demo**" in README.md are run with bash, unchanged, from a
copy of the project's tracked files placed beside it (so `../shared/data` resolves), with fresh
`FLOWERTUNE_HOME`, `FLWR_HOME` and `HF_HOME`. Prints the wall time and output line count of each
block, the run's round lines and the evaluation's summary, every warning line, and whether a
defunct process was left; then stops the local SuperLink it started (by PID).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from flowertune_llm.federation import local_superlink_processes, stop_local_superlink
from tests.benchmarks import machine

ROOT = Path(__file__).resolve().parents[2]
LOCAL_SUPERLINK_PORT = 39091
MARKER = "@@readme-demo-block-2@@"


def readme_demo_blocks(readme: Path = ROOT / "README.md") -> list[str]:
    """The first two bash blocks after the '**Offline demo**' paragraph."""
    text = readme.read_text()
    start = text.index("**Offline demo**")
    blocks = re.findall(r"```bash\n(.*?)```", text[start:], flags=re.S)
    if len(blocks) < 2:
        raise SystemExit("README.md: expected two ```bash blocks after **Offline demo**")
    return blocks[:2]


def port_in_use(port: int) -> bool:
    """Whether something listens on 127.0.0.1:port."""
    with socket.socket() as sock:
        return sock.connect_ex(("127.0.0.1", port)) == 0


def defunct_children(pids: list[int]) -> list[str]:
    """Zombie descendants of these processes, as 'pid name'."""
    found = []
    for pid in pids:
        try:
            for child in psutil.Process(pid).children(recursive=True):
                if child.status() == psutil.STATUS_ZOMBIE:
                    found.append(f"{child.pid} {child.name()}")
        except psutil.NoSuchProcess:
            continue
    return found


def main() -> int:
    """Run both blocks; exit non-zero if either fails."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="keep the temporary project copy and homes")
    parser.add_argument("--log", type=Path, help="write the whole output of both blocks here")
    args = parser.parse_args()
    if port_in_use(LOCAL_SUPERLINK_PORT):
        print(f"127.0.0.1:{LOCAL_SUPERLINK_PORT} is in use: a local SuperLink is already running, and the "
              "demo would use it instead of a fresh one. Stop it first (flowertune-llm stop-local-superlink).")
        return 2
    blocks = readme_demo_blocks()
    work = Path(tempfile.mkdtemp(prefix=".readme-demo-", dir=ROOT.parent))
    project = work / "project"  # ../shared from here is not the data: link it beside the copy
    (work / "shared").symlink_to(ROOT.parent / "shared")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in files:
        (project / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, project / name)
    env = dict(os.environ)
    for key in ("FLOWERTUNE_HOME", "FLWR_HOME", "HF_HOME"):
        env[key] = str(work / key.lower())
    env.pop("HF_HUB_OFFLINE", None)  # the README sets it itself
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    print(f"machine: {machine()}\nproject copy: {project}\nfresh homes under {work}", flush=True)
    # one shell, as a user pastes the blocks one after the other; a marker splits the output
    script = f"set -eo pipefail\n{blocks[0]}\necho {MARKER} $(date +%s.%N)\n{blocks[1]}"
    start = time.time()
    try:
        proc = subprocess.run(["bash", "-c", script], cwd=project, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, check=False)
        end = time.time()
        zombies = defunct_children([p.pid for p in local_superlink_processes(Path(env["FLWR_HOME"]))])
    finally:
        stopped = stop_local_superlink(Path(env["FLWR_HOME"]))
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    if args.log:
        args.log.write_text(proc.stdout)
    first, _, rest = proc.stdout.partition(MARKER)
    marker_time, _, second = rest.partition("\n")
    split = float(marker_time) if marker_time.strip() else end
    parts = [(first, split - start), (second, end - split)] if rest else [(proc.stdout, end - start)]
    for i, (text, seconds) in enumerate(parts, 1):
        lines = text.splitlines()
        print(f"\n=== block {i}: {seconds:.0f} s, {len(lines)} output lines ===")
        keep = r"\[round |Done:|Run folder|average|avg|letter|Warning|WARNING|Error|ERROR|model.name"
        print("\n".join(line for line in lines if re.search(keep, line)))
    print(f"\nexit status {proc.returncode}")
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
    print(f"defunct processes under the SuperLink at the end: {zombies or 'none'}; stopped SuperLink PIDs {stopped}")
    return proc.returncode


if __name__ == "__main__":
    sys.exit(main())
