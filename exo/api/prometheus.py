"""A node's counters in the Prometheus text exposition format (version 0.0.4), for `/metrics`.

Written here rather than taken from prometheus_client: a dozen families rendered on request
need only the format's few rules (HELP and TYPE lines, escaped label values, `_total`
counters), and the node's counters stay plain numbers with no registry to keep in sync.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import msgspec

from exo.orchestration import counters as status
from exo.orchestration.admission import QUEUE_FULL, QUEUE_TIMEOUT

if TYPE_CHECKING:
    from exo.orchestration.node import Node

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
STATUSES = (status.COMPLETED, status.STOPPED, status.CANCELLED, status.FAILED, status.REJECTED)
REASONS = (QUEUE_FULL, QUEUE_TIMEOUT, "cache_full")


class Family(msgspec.Struct):
    """One metric: its name, kind (counter or gauge), help text and samples (labels, value)."""

    name: str
    kind: str
    help: str
    samples: list[tuple[dict[str, str], float]] = []

    def add(self, value: float, **labels: str) -> "Family":
        self.samples.append((labels, value))
        return self


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(int(value)) if float(value).is_integer() and abs(value) < 2 ** 53 else repr(float(value))


def render(families: list[Family]) -> str:
    """The exposition text: per family a HELP and a TYPE line, then one line per sample."""
    lines: list[str] = []
    for family in families:
        lines.append(f"# HELP {family.name} {_escape_help(family.help)}")
        lines.append(f"# TYPE {family.name} {family.kind}")
        for labels, value in family.samples:
            label_text = ",".join(f'{key}="{_escape_label(str(val))}"' for key, val in sorted(labels.items()))
            lines.append(f"{family.name}{{{label_text}}} {_number(value)}" if label_text
                         else f"{family.name} {_number(value)}")
    return "\n".join(lines) + "\n"


def node_families(node: "Node") -> list[Family]:
    """Everything /metrics reports about `node`, read from its counters and admission gate."""
    counts, gate = node.counters, node.admission
    requests = Family("exo_requests_total", "counter", "Requests that ended, by how they ended.")
    for name in sorted(set(STATUSES) | set(counts.requests)):
        requests.add(counts.requests[name], status=name)
    rejected = Family("exo_requests_rejected_total", "counter", "Requests refused, by reason.")
    for reason in sorted(set(REASONS) | set(counts.rejected)):
        rejected.add(counts.rejected[reason], reason=reason)
    drafted = Family("exo_speculative_drafted_tokens_total", "counter", "Tokens proposed, per drafter.")
    accepted = Family("exo_speculative_accepted_tokens_total", "counter",
                      "Proposed tokens the target accepted, per drafter.")
    ratio = Family("exo_speculative_acceptance_ratio", "gauge", "Accepted over drafted tokens, per drafter.")
    for drafter in sorted(set(counts.drafted) | set(counts.accepted)):
        drafted.add(counts.drafted[drafter], drafter=drafter)
        accepted.add(counts.accepted[drafter], drafter=drafter)
        ratio.add(counts.accepted[drafter] / counts.drafted[drafter] if counts.drafted[drafter] else 0.0,
                  drafter=drafter)
    stages = Family("exo_ring_stage_compute_seconds_total", "counter",
                    "Seconds each ring stage computed for requests scheduled here.")
    for stage in sorted(counts.ring_compute_seconds):
        stages.add(counts.ring_compute_seconds[stage], stage=str(stage))
    passes = Family("exo_engine_passes_total", "counter", "Forward passes each engine ran (batched or not).")
    shared = Family("exo_engine_batched_rows_total", "counter",
                    "Calls that shared their forward pass with another request's.")
    for role, engine in (("target", node.engine.target), ("draft", node.engine.draft)):
        stats = engine.batch_stats()
        if stats is not None:
            passes.add(stats["passes"], engine=role)
            shared.add(stats["batched_rows"], engine=role)
    return [
        Family("exo_node_info", "gauge", "This node (value always 1).").add(1, node_id=node.id),
        requests, rejected,
        Family("exo_prompt_tokens_total", "counter", "Prompt tokens of admitted requests.").add(counts.prompt_tokens),
        Family("exo_generated_tokens_total", "counter", "Tokens generated.").add(counts.generated_tokens),
        drafted, accepted, ratio,
        Family("exo_requests_live", "gauge", "Requests holding an admission slot now.").add(len(gate.live)),
        Family("exo_requests_queued", "gauge", "Requests waiting for an admission slot.").add(gate.queued),
        Family("exo_requests_max_live", "gauge", "The admission limit (--max-concurrent-requests).").add(
            gate.max_live),
        Family("exo_requests_admitted_total", "counter", "Requests given an admission slot.").add(gate.admitted),
        Family("exo_admission_wait_seconds_total", "counter", "Seconds admitted requests spent queued.").add(
            gate.wait_seconds),
        Family("exo_ring_passes_total", "counter", "Blocks sent round the ring by requests scheduled here.").add(
            counts.ring_passes),
        Family("exo_ring_pass_seconds_total", "counter", "Wall seconds of those ring passes.").add(
            counts.ring_wall_seconds),
        stages, passes, shared,
    ]


def exposition(node: "Node") -> str:
    return render(node_families(node))
