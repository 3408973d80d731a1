"""The metric files of `--workers N`, read by the supervisor, and what it keeps of a dead worker.

In prometheus-client's multiprocess mode every process writes its samples to files named by its
pid, and a scrape reads them all. `mark_process_dead` deletes only a dead process's live gauges:
its counters and histograms must keep counting in the totals, so their files stay, two more for
every worker restart, for as long as the supervisor runs. Here a dead worker's files are merged
into one archive file per type (`MultiProcessCollector.merge(accumulate=False)`, the form the
files hold, as its docstring says to when writing merged data back) and deleted: the folder holds
the live processes' files and the archives, however often workers restart.

The usual objections to merging (a pid reused by a new process, two merges at once, a scrape in
the middle) do not arise: only the supervisor merges, only a worker it has seen exit, and the
merge and the scrapes take turns under one lock.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead

ARCHIVED = ("counter", "histogram", "summary")  # the file types whose values add up across processes
ARCHIVE = "archive"  # in place of a pid: `counter_archive.db` holds every dead worker's counters


class WorkerMetricFiles(MultiProcessCollector):
    """The collector of every worker's files (register it to serve them), and their archivist."""

    def __init__(self, path: str, registry: CollectorRegistry | None = None):
        self._lock = threading.Lock()  # a scrape (in a worker thread) never sees a merge half done
        super().__init__(registry, path=path)  # type: ignore[no-untyped-call]
        self.path = path

    def collect(self) -> Iterable[Metric]:
        with self._lock:
            return list(super().collect())  # type: ignore[no-untyped-call]

    def process_dead(self, pid: int) -> None:
        """Worker `pid` has exited: drop its live gauges, fold its other files into the archives."""
        with self._lock:
            mark_process_dead(pid, self.path)  # type: ignore[no-untyped-call]
            for kind in ARCHIVED:
                dead = os.path.join(self.path, f"{kind}_{pid}.db")
                if os.path.exists(dead):
                    self._archive(kind, dead)

    def _archive(self, kind: str, dead: str) -> None:
        archive = os.path.join(self.path, f"{kind}_{ARCHIVE}.db")
        files = [f for f in (archive, dead) if os.path.exists(f)]
        merged = MultiProcessCollector.merge(files, accumulate=False)  # type: ignore[no-untyped-call]
        staged = archive + ".new"  # not `*.db`: a scrape never reads it
        if os.path.exists(staged):
            os.remove(staged)  # left by a merge that was interrupted
        values = MmapedDict(staged)  # type: ignore[no-untyped-call]
        try:
            for metric in merged:
                for s in metric.samples:
                    key = mmap_key(metric.name, s.name, list(s.labels), list(s.labels.values()), metric.documentation)
                    values.write_value(key, s.value, 0.0)  # type: ignore[no-untyped-call]
        finally:
            values.close()  # type: ignore[no-untyped-call]
        os.replace(staged, archive)
        os.remove(dead)
