"""The method registry: every system the pipeline can build and evaluate, by key (docs/DESIGN.md "Methods").

Static merges (one backbone, task heads) are every `twinmerge.merge.MERGE_METHODS` entry; routed methods
(shared backbone + per-expert deltas chosen per input) are classes in this package. A new static merge is a
function registered in `merge.py`; a new routed method is a module here and one line below.
"""
from twinmerge.merge import MERGE_METHODS
from twinmerge.methods.base import Context, Mode, RoutedMethod
from twinmerge.methods.static import StaticMethod
from twinmerge.methods.emr import EMRMerging
from twinmerge.methods.layerwise import LayerwiseMerging
from twinmerge.methods.twin import TwinMerging

METHODS: dict = {key: StaticMethod(key, m) for key, m in MERGE_METHODS.items()}
for _routed in (TwinMerging(), EMRMerging(), LayerwiseMerging()):
    METHODS[_routed.key] = _routed

__all__ = ["METHODS", "Context", "Mode", "RoutedMethod", "StaticMethod"]
