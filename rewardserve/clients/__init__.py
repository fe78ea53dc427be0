"""`rewardserve.clients`: the documented import face of the clients (docs/clients.md).

`from rewardserve.clients import RewardClient` gives the top-level `clients/` package of this distribution under
a name that a user's own `clients.py` (or `clients/`, `protos/`, `training/` ...) next to their script cannot
shadow. This module replaces itself with `clients/__init__.py` loaded under this name, with `clients/` as its
search path, so `rewardserve.clients.<module>` is `clients/<module>.py`; the clients import each other
relatively and the gRPC modules through `rewardserve.protos` (clients/wire.py). `clients/` lies beside
`rewardserve/` in both a wheel and an editable install.
"""

import importlib.util
import sys
from pathlib import Path

_HOME = Path(__file__).resolve().parents[2] / "clients"
_spec = importlib.util.spec_from_file_location(__name__, _HOME / "__init__.py",
                                               submodule_search_locations=[str(_HOME)])
_module = importlib.util.module_from_spec(_spec)
sys.modules[__name__] = _module  # the import system returns (and binds) what sys.modules holds after this runs
_spec.loader.exec_module(_module)
