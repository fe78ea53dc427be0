#!/usr/bin/env bash
# Regenerates protos/reward_pb2.py, protos/reward_pb2_grpc.py and protos/reward_pb2.pyi from protos/reward.proto.
#
#   scripts/gen_protos.sh            # write next to the .proto (commit the result)
#   scripts/gen_protos.sh OUT_DIR    # write OUT_DIR/protos/... instead (tests/unit/test_protos_fresh.py)
#
# The proto is compiled with the repo root as include path, so the generated code imports
# `from protos import reward_pb2` (no import rewriting needed). Output depends only on the .proto and the
# pinned grpcio-tools (its bundled protoc), so it is deterministic. PYTHON picks the interpreter.
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

# Guard: the service module must import the messages through the package.
if ! grep -q '^from protos import reward_pb2 as ' "$OUT/protos/reward_pb2_grpc.py"; then
  echo "gen_protos.sh: unexpected import in reward_pb2_grpc.py" >&2
  exit 1
fi
