"""What a run costs: the cost report (billed and raw instance-seconds, busy seconds,
dispatch times) and the cap ``max_cost_usd``.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
import time

from ..ec2.pricing import billed_seconds, estimate_cost
from ..exceptions import EC2Error
from .job import _Job

logger = logging.getLogger("nipype.workflow")


def dispatch_summary(timings: list[dict]) -> dict:
    """Median and 95th percentile of the waits around each remote node, in seconds.

    ``to_start``: submitted by the controller → the node starts on an instance (queue,
    agent, worker start-up, input staging). ``to_seen``: the node ends → the controller
    has its result in place (output upload, report, event, collection). ``queued``,
    ``starting``, ``running``, ``storing`` and ``collecting`` split the whole way.
    """
    def stats(values):
        values = sorted(v for v in values if v is not None)
        if not values:
            return None
        p95 = values[min(len(values) - 1, max(0, math.ceil(0.95 * len(values)) - 1))]
        return {"median": round(statistics.median(values), 3), "p95": round(p95, 3)}

    def waits(start, end):
        return [t[end] - t[start] for t in timings
                if t.get(start) is not None and t.get(end) is not None]

    return {"jobs": len(timings),
            "to_start": stats(waits("submitted", "node_started")),
            "to_seen": stats(waits("node_finished", "collected")),
            # the parts: waiting for a free slot, starting (worker, inputs, unpickling),
            # the node itself, storing its outputs, the controller noticing and fetching
            "queued": stats(waits("submitted", "received")),
            "starting": stats(waits("received", "node_started")),
            "running": stats(waits("node_started", "node_finished")),
            "storing": stats(waits("node_finished", "reported")),
            "collecting": stats(waits("reported", "collected"))}


class CostMixin:
    """The run's cost report and cost cap (the backend gives ``_fleets``)."""

    def _store_cost_report(self, end: float, own: dict) -> dict:
        """The report: what every backend says of a run (times, busy seconds, jobs,
        bytes, dispatch) and the backend's ``own`` figures, kept as ``cost_report`` and
        written to ``runs/<run>/cost.json``."""
        report = {
            "run_id": self.run_id, "started": self.started, "finished": end,
            "wall_seconds": round(end - self.started, 1),
            "busy_seconds": round(self._busy_seconds, 1),
            "jobs_remote": self.stats["remote_done"], "jobs_local": self.stats["local"],
            "bytes_staged": self.store.bytes_up, "bytes_fetched": self.store.bytes_down,
            "dispatch": dispatch_summary(self.timings), **own}
        self.cost_report = report
        self.s3.put_object(Bucket=self.layout.bucket, Key=self.layout.cost_key,
                           Body=json.dumps(report, indent=1).encode(),
                           ContentType="application/json")
        return report

    def _write_cost_report(self) -> None:
        fleets = list((getattr(self, "_fleets", None) or {}).values())
        if not fleets:
            return
        end = time.time()
        instances = []
        total_cost = 0.0
        billed = 0.0
        launched = {}
        for fleet in fleets:
            launched.update(fleet.pool.launched)
        ran = 0.0
        for iid, info in sorted(launched.items()):
            seconds = max(0.0, info.get("terminated", end) - info["launched"])
            cost = estimate_cost(info.get("type") or self.settings.instance_type, seconds,
                                 spot=info.get("spot", False))
            ran += seconds
            billed += billed_seconds(seconds)  # as AWS bills: at least 60 s an instance
            total_cost += cost or 0.0
            instances.append({"instance_id": iid, "type": info.get("type"),
                              "spot": info.get("spot", False), "seconds": round(seconds, 1),
                              "billed_seconds": round(billed_seconds(seconds), 1),
                              "usd_estimate": cost})
        self._store_cost_report(end, {
            "instances": instances,
            "instance_seconds": round(ran, 1), "billed_seconds": round(billed, 1),
            "usd_estimate": round(total_cost, 4), "peak_instances": self.peak,
            "note": "estimate from on-demand list prices (us-east-1), per-second billing "
                    "with a 60 s minimum; not a bill",
        })
        logger.info("EC2Plugin: run %s cost: %d instances, %.0f instance-s billed (60 s minimum "
                    "each), %.0f s busy, "
                    "~$%.4f, %d B staged, %d B fetched (s3://%s/%s)", self.run_id,
                    len(instances), billed, self._busy_seconds, total_cost,
                    self.store.bytes_up, self.store.bytes_down, self.layout.bucket,
                    self.layout.cost_key)

    def _cost_so_far(self) -> float:
        """The run's estimated cost now: each instance at least its minute."""
        now = time.time()
        total = 0.0
        for fleet in self._fleets.values():
            for info in fleet.pool.launched.values():
                seconds = info.get("terminated", now) - info["launched"]
                total += estimate_cost(info.get("type") or fleet.instance_type, seconds,
                                       spot=info.get("spot", False)) or 0.0
        return total

    def _affordable(self, instance_type: str) -> int:
        """How many more instances of ``instance_type`` fit under ``max_cost_usd``, each
        counted at its minimum (a minute, on-demand)."""
        cap = self.settings.max_cost_usd
        if cap is None:
            return 1 << 30
        each = estimate_cost(instance_type, 60.0) or 0.0
        left = float(cap) - self._cost_so_far()
        return int(left // each) if each > 0 else 1 << 30

    def _cost_message(self, waiting: list[_Job], launching: str | None = None) -> str:
        cap = float(self.settings.max_cost_usd)
        names = sorted(getattr(j.node, "itername", j.node.fullname) for j in waiting)
        shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5
                                        else "")
        what = (f"launching a {launching} (at least ${estimate_cost(launching, 60.0):.4f}) "
                f"would take the run's estimate past max_cost_usd=${cap:g}" if launching
                else f"the run's estimated cost (${self._cost_so_far():.4f}) reached "
                     f"max_cost_usd=${cap:g}")
        return (f"Run {self.run_id} stopped: {what}. {len(names)} node(s) not run: {shown}. "
                "Every instance of the run is terminated. Raise max_cost_usd, or run "
                "fewer or smaller nodes.")

    def _check_cost(self, waiting: list[_Job]) -> bool:
        """Stop the run once its estimated cost reaches ``max_cost_usd``."""
        cap = self.settings.max_cost_usd
        if cap is None or self._cost_so_far() < float(cap):
            return False
        self._stop_run(EC2Error(self._cost_message(waiting)),
                       "the run reached its cost cap (max_cost_usd)")
        return True
