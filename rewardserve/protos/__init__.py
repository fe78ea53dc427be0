"""`rewardserve.protos`: the top-level `protos/` package (reward.proto and its generated modules) under a name a
user's own `protos` package cannot shadow; `rewardserve.clients` imports its gRPC modules from here.

This module replaces itself with `protos/__init__.py` loaded under this name, with `protos/` as its search path
(see rewardserve/clients/__init__.py). protos/reward_pb2_grpc.py imports `reward_pb2` relatively, so each name
gets its own pair of modules; protobuf's descriptor pool holds the file once and both share its message classes.
"""

import importlib.util
import sys
from pathlib import Path

_HOME = Path(__file__).resolve().parents[2] / "protos"
_spec = importlib.util.spec_from_file_location(__name__, _HOME / "__init__.py",
                                               submodule_search_locations=[str(_HOME)])
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module  # the import system returns (and binds) what sys.modules holds after this runs
_spec.loader.exec_module(_module)
