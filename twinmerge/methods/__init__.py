"""The method registry: every system the pipeline can build and evaluate, by key (docs/DESIGN.md "Methods").

Static merges (one backbone, task heads) are every `twinmerge.merge.MERGE_METHODS` entry; learning static
methods (AdaMerging, Concrete, Self Positioning: `learned.py`) and routed methods (shared backbone + per-expert
deltas chosen per input) are classes in this package. A new static merge is a function registered in
`merge.py`; a new learning or routed method is a class here and one entry below.
"""
from twinmerge.merge import MERGE_METHODS
from twinmerge.methods.base import Context, Mode, RoutedMethod
from twinmerge.methods.static import StaticMethod
from twinmerge.methods.emr import EMRMerging
from twinmerge.methods.layerwise import LayerwiseMerging
from twinmerge.methods.learned import AdaMerging, ConcreteSubspace, SelfPositioning
from twinmerge.methods.twin import TwinMerging
from twinmerge.methods.wemoe import WEMoE

METHODS: dict = {key: StaticMethod(key, m) for key, m in MERGE_METHODS.items()}
for _method in (AdaMerging(), ConcreteSubspace(), SelfPositioning(), TwinMerging(), EMRMerging(),
                LayerwiseMerging(), WEMoE()):
    METHODS[_method.key] = _method

__all__ = ["METHODS", "Context", "Mode", "RoutedMethod", "StaticMethod"]
