"""Self-supervised methods, one small file each, listed in one explicit registry (`registry.py`).

Every method follows the contract of `pipeline.methods.base.Method` (forward, the two hooks, backbone,
embed) and has a frozen config dataclass in `config.py` whose `name` is its registry key. The methods
(torch) load on first use of `METHODS`, `Method` or `build_method`, so reading a config imports no torch.
"""

from pipeline.lazy import lazy_attributes
from pipeline.methods.config import METHOD_CONFIGS, MethodConfig

__getattr__ = lazy_attributes(
    __name__, {"METHODS": ".registry", "build_method": ".registry", "Method": ".base"}
)

__all__ = ["METHODS", "METHOD_CONFIGS", "Method", "MethodConfig", "build_method"]
