#!/bin/sh
# Regenerates the TypeScript code for fedtune's wire contract (proto/fedtune/v1/*.proto)
# into proto/gen, and for the ONNX model messages the engine's graph builder writes
# (worker/engine/onnx/onnx.proto) into worker/engine/onnx/gen, with ts-proto driven by
# buf (from the @bufbuild/buf npm package).
# Usage: scripts/gen-proto.sh [OUTPUT_ROOT]   (default: the repository root)
set -eu
cd "$(dirname "$0")/.."
out="${1:-.}"
buf="node_modules/.bin/buf"
[ -x "$buf" ] || { echo "gen-proto: $buf not found: run npm ci first" >&2; exit 1; }
if [ "$out" = "." ]; then rm -rf proto/gen worker/engine/onnx/gen; fi
"$buf" generate proto --template proto/buf.gen.yaml --output "$out"
"$buf" generate worker/engine/onnx --template worker/engine/onnx/buf.gen.yaml --output "$out"
