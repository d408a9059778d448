"""DCP planners that apply dcp_forge's storage keys and writer placement.

Both work on their own, straight in ``dcp.save`` / ``dcp.load``::

    dcp.save(state_dict, checkpoint_id=path,
             planner=ForgeSavePlanner({"rng": "per_rank", "model": "replicated"}))
"""

from .load import ForgeLoadPlanner
from .plan_cache import PlanCache
from .save import ForgeSavePlanner

__all__ = ["ForgeLoadPlanner", "ForgeSavePlanner", "PlanCache"]
