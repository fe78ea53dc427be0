#!/usr/bin/env bash
# Regenerates protos/reward_pb2.py, protos/reward_pb2_grpc.py and protos/reward_pb2.pyi from protos/reward.proto.
#
#   scripts/gen_protos.sh            # write next to the .proto (commit the result)
#   scripts/gen_protos.sh OUT_DIR    # write OUT_DIR/protos/... instead (tests/unit/test_protos_fresh.py)
#
# The proto is compiled with the repo root as include path, so protoc writes `from protos import reward_pb2`
# into reward_pb2_grpc.py; that one line is rewritten to `from . import reward_pb2`, so the package also works
# under its second name `rewardserve.protos` (what `rewardserve.clients` uses; a user's own `protos` package
# cannot shadow it). Output depends only on the .proto and the pinned grpcio-tools (its bundled protoc), so it
# is deterministic. PYTHON picks the interpreter.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$(mkdir -p "${1:-$ROOT}" && cd "${1:-$ROOT}" && pwd)"
PYTHON="${PYTHON:-python}"

mkdir -p "$OUT/protos"
cd "$ROOT"
"$PYTHON" -m grpc_tools.protoc \
  --proto_path=. \
  --python_out="$OUT" \
  --pyi_out="$OUT" \
  --grpc_python_out="$OUT" \
  protos/reward.proto

# The service module imports the messages relatively (guarded: protoc's import line must be the expected one).
GRPC_PY="$OUT/protos/reward_pb2_grpc.py"
if ! grep -q '^from protos import reward_pb2 as ' "$GRPC_PY"; then
  echo "gen_protos.sh: unexpected import in reward_pb2_grpc.py" >&2
  exit 1
fi
sed -i.orig 's/^from protos import reward_pb2 as /from . import reward_pb2 as /' "$GRPC_PY" && rm -f "$GRPC_PY.orig"
