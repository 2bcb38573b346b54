#!/bin/sh
# Regenerates the TypeScript code for fedtune's wire contract (proto/fedtune/v1/*.proto)
# into proto/gen with ts-proto, driven by buf (from the @bufbuild/buf npm package).
# Usage: scripts/gen-proto.sh [OUTPUT_ROOT]   (default: the repository root; writes OUTPUT_ROOT/proto/gen)
set -eu
cd "$(dirname "$0")/.."
out="${1:-.}"
buf="node_modules/.bin/buf"
[ -x "$buf" ] || { echo "gen-proto: $buf not found: run npm ci first" >&2; exit 1; }
if [ "$out" = "." ]; then rm -rf proto/gen; fi
"$buf" generate proto --template proto/buf.gen.yaml --output "$out"
