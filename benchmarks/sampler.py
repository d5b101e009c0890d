"""psutil sampling of the processes under test: cumulative CPU time and RSS every 0.2 s, in a background thread.

CPU over a window is the CPU-time delta (interpolated linearly between samples at the window's edges) over wall time,
where 1.0 is one core. Windows are given in epoch seconds so they can come from server timestamps.
"""

from __future__ import annotations

import bisect
import threading
import time

import psutil

HOST = "host"  # pseudo-process: CPU time of the whole machine, every core, every process


class Sampler:
    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._lock = threading.Lock()
        self._watched: dict[str, psutil.Process] = {}
        # name → parallel lists: wall time (epoch s), cumulative user+system CPU (s), RSS (bytes)
        self._times: dict[str, list[float]] = {}
        self._cpu: dict[str, list[float]] = {}
        self._rss: dict[str, list[int]] = {}
        self._hwm: dict[str, int] = {}  # the kernel's RSS high-water mark (VmHWM), which 0.2 s samples can miss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)

    def start(self) -> None:
        self.sample(HOST)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def watch(self, name: str, pid: int) -> None:
        with self._lock:
            self._watched[name] = psutil.Process(pid)
            self._times[name], self._cpu[name], self._rss[name] = [], [], []
        self.sample(name)

    def unwatch(self, name: str) -> None:
        self.sample(name)
        with self._lock:
            self._watched.pop(name, None)

    def sample(self, name: str | None = None) -> None:
        """Take one sample now, of ``name`` or of every watched process (and the whole host, as ``HOST``)."""
        with self._lock:
            if name is None or name == HOST:
                host = psutil.cpu_times()
                # guest time is already inside user; steal is the hypervisor's, not this machine's processes'
                busy = host.user + host.nice + host.system + getattr(host, "irq", 0.0) + getattr(host, "softirq", 0.0)
                self._times.setdefault(HOST, []).append(time.time())
                self._cpu.setdefault(HOST, []).append(busy)
                self._rss.setdefault(HOST, []).append(0)
            if name is None:
                targets = list(self._watched.items())
            else:
                targets = [(name, self._watched[name])] if name in self._watched else []
            for key, proc in targets:
                try:
                    with proc.oneshot():
                        times = proc.cpu_times()
                        rss = proc.memory_info().rss
                except psutil.Error:  # exited: keep what was sampled
                    continue
                self._times[key].append(time.time())
                self._cpu[key].append(times.user + times.system)
                self._rss[key].append(rss)
                hwm = _vm_hwm(proc.pid)
                if hwm is not None:
                    self._hwm[key] = hwm

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def _cpu_at(self, name: str, when: float) -> float | None:
        times, cpu = self._times.get(name, []), self._cpu.get(name, [])
        if not times:
            return None
        i = bisect.bisect_left(times, when)
        if i == 0:
            return cpu[0]
        if i >= len(times):
            return cpu[-1]
        t0, t1 = times[i - 1], times[i]
        share = (when - t0) / (t1 - t0) if t1 > t0 else 1.0
        return cpu[i - 1] + (cpu[i] - cpu[i - 1]) * share

    def cpu(self, name: str, start: float, end: float) -> float | None:
        """Cores used by ``name`` between ``start`` and ``end`` (epoch seconds): 1.0 = one core."""
        with self._lock:
            if end <= start:
                return None
            first, last = self._cpu_at(name, start), self._cpu_at(name, end)
        if first is None or last is None:
            return None
        return (last - first) / (end - start)

    def cpu_seconds(self, name: str, start: float, end: float) -> float | None:
        """CPU seconds (user + system: ``/proc/<pid>/stat`` utime + stime, as psutil reads them) that ``name`` used
        between ``start`` and ``end`` (epoch seconds), interpolated between samples at the edges."""
        with self._lock:
            if end <= start:
                return None
            first, last = self._cpu_at(name, start), self._cpu_at(name, end)
        if first is None or last is None:
            return None
        return last - first

    def high_water_rss(self, name: str) -> int | None:
        """The kernel's peak RSS (bytes) of ``name`` over its life, as of its last sample (Linux only)."""
        with self._lock:
            return self._hwm.get(name)

    def peak_rss(self, name: str, start: float | None = None, end: float | None = None) -> int | None:
        """Largest sampled RSS (bytes) of ``name`` within the window (or over its whole life)."""
        with self._lock:
            samples = [
                rss
                for t, rss in zip(self._times.get(name, []), self._rss.get(name, []), strict=True)
                if (start is None or t >= start) and (end is None or t <= end)
            ]
        return max(samples) if samples else None


def _vm_hwm(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        return None
    return None
