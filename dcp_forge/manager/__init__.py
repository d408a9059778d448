"""When to save, what to keep, what to resume: ``CheckpointManager`` and its retention planning,
driven by a small ``CheckpointPolicy``, usable with or without dcp_forge's trainers."""

from .manager import CheckpointManager
from .policy import CheckpointPolicy
from .retention import CheckpointRecord, MetricCredit, RetentionPlan, RetentionPolicy, plan_retention

__all__ = ["CheckpointManager", "CheckpointPolicy", "CheckpointRecord", "MetricCredit", "RetentionPlan",
           "RetentionPolicy", "plan_retention"]
