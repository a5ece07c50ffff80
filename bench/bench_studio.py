"""How fast a metric line reaches the loss curve, and what following a run
costs the studio.

Starts the real studio (``python app.py``) on a fresh work directory, launches
the demo run from it, and opens the Runs tab in headless Debian Chromium.
Two watchers run side by side in this process:

- the run folder: when each new line of metrics.jsonl becomes visible
  (polled every 5 ms);
- the page: how many points the drawn loss curve has (polled every 20 ms).

Latency of line N = the time the curve first has N points - the time line N
appeared in the file. The studio's CPU use is its process's user+system time
(all threads, from /proc) over the following window, as a share of one core.

    python bench/bench_studio.py [--seconds 40]

Floors (issue 5): latency <= 3 s; studio CPU while following < 5% of one core.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT))

from backend.core.rundir import RunDir, effective_status  # noqa: E402
from backend.runs import abort  # noqa: E402
from studio_utils import running_studio, wait_for  # noqa: E402
from studio.runs_tab import POLL_S  # noqa: E402

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=40, help="how long to follow the run")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    tmp = Path(tempfile.mkdtemp(prefix="bench_studio."))
    os.environ.setdefault("FTSTUDIO_DEMO_DIR", str(tmp / "demo"))
    work = tmp / "work"
    with running_studio(work) as (url, studio), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1440, "height": 1000})
        page.set_default_timeout(120_000)
        page.goto(url)
        page.get_by_role("tab", name="Train").click()
        page.locator("#train-memory").get_by_text("Memory estimate").wait_for()
        page.locator("#train-launch").click()
        run_dir = wait_for(lambda: next(work.glob("tiny_demo-*"), None), timeout=60)
        metrics = run_dir / "metrics.jsonl"
        assert wait_for(lambda: metrics.exists(), timeout=300), "the run wrote no metrics"

        file_times: list[float] = []
        stop = threading.Event()

        def watch_file():
            seen = 0
            while not stop.is_set():
                try:
                    n = metrics.read_bytes().count(b"\n")
                except OSError:
                    n = 0
                now = time.time()
                while seen < n:
                    file_times.append(now)
                    seen += 1
                time.sleep(0.005)

        watcher = threading.Thread(target=watch_file, daemon=True)
        watcher.start()
        curve_times: dict[int, float] = {}
        line = page.locator("#runs-loss svg g.mark-line path").first
        cpu0, t0 = cpu_seconds(studio.pid), time.time()
        while time.time() - t0 < args.seconds:
            try:
                d = line.get_attribute("d", timeout=1000) or ""
            except Exception:  # noqa: BLE001 - not drawn yet
                d = ""
            points = len(re.findall(r"[ML]", d))
            now = time.time()
            for k in range(1, points + 1):
                curve_times.setdefault(k, now)
            time.sleep(0.02)
        cpu1, t1 = cpu_seconds(studio.pid), time.time()
        stop.set()
        watcher.join()
        browser.close()
        abort(RunDir(run_dir))  # runs outlive the studio by design: stop this one
        wait_for(lambda: effective_status(RunDir(run_dir)).get("state") != "running", timeout=120)

    lat = [curve_times[k] - file_times[k - 1] for k in sorted(curve_times)
           if k - 1 < len(file_times) and k > 5]  # skip the first points: drawn as the page caught up
    if not lat:
        print("no metric line reached the curve in the window")
        return 1
    lat.sort()
    cpu = (cpu1 - cpu0) / (t1 - t0) * 100
    print(f"metric line -> loss curve, {len(lat)} lines: median {statistics.median(lat):.2f} s, "
          f"p95 {lat[int(0.95 * (len(lat) - 1))]:.2f} s, max {lat[-1]:.2f} s (floor: <= 3 s)")
    print(f"studio CPU while following for {t1 - t0:.0f} s: {cpu:.2f}% of one core (floor: < 5%)")
    print(f"(the training wrote {len(file_times)} lines in that time; the page polls every {POLL_S} s)")
    return 0 if lat[-1] <= 3 and cpu < 5 else 1


if __name__ == "__main__":
    sys.exit(main())
