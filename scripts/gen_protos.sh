#!/usr/bin/env bash
# Regenerates the committed *_pb2.py files from the .proto sources.
#
# Pinned generator: grpcio-tools 1.62.3 (bundles protoc 25.x, the protobuf 4.25 generation). Code
# from this generator carries no runtime-version gate, so it imports under every protobuf runtime
# the package allows (protobuf>=4.25,<8; checked with 4.25 and 7.x). The generator lives in its own
# throw-away virtual environment so it never changes the project's protobuf runtime.
set -euo pipefail
cd "$(dirname "$0")/.."
GEN_VENV="${GEN_VENV:-/tmp/ffn-protoc-venv}"
if [ ! -x "$GEN_VENV/bin/python" ]; then
  python3 -m venv "$GEN_VENV"
  "$GEN_VENV/bin/pip" install -q "grpcio-tools==1.62.3" "protobuf==4.25.3"
fi
"$GEN_VENV/bin/python" -m grpc_tools.protoc -I . --python_out=. \
  ffn/utils/vector.proto ffn/utils/bounding_box.proto ffn/inference/inference.proto \
  ffn/consensus/consensus.proto
echo "generated: ffn/utils/vector_pb2.py ffn/utils/bounding_box_pb2.py ffn/inference/inference_pb2.py" \
  "ffn/consensus/consensus_pb2.py"
