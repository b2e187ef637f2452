#!/usr/bin/env bash
# `make contract`: buf lint over protos/, then buf breaking against a baseline of protos/ taken from git.
#
# The baseline, the first that applies:
#   1. $NLPMESH_CONTRACT_BASE: any git ref (CI of a pull request sets it to the target branch);
#   2. the newest release tag (v*) that is not HEAD itself;
#   3. the merge base with main, when HEAD is on a branch off it;
#   4. on main itself (a clean clone in CI): the parent of the newest commit that changed protos/,
#      so the last change to the contract is checked.
# No baseline at all (no protos/ in the history yet) skips the breaking check and says so.
set -euo pipefail
cd "$(dirname "$0")/.."
BUF=tools/buf/node_modules/.bin/buf
[ -x "$BUF" ] || { echo "[contract] $BUF missing: run make tools" >&2; exit 2; }

"$BUF" lint
echo "[contract] buf lint: clean"

head=$(git rev-parse HEAD)
base=""
if [ -n "${NLPMESH_CONTRACT_BASE:-}" ]; then
  base=$(git rev-parse --verify "$NLPMESH_CONTRACT_BASE^{commit}")
  why="NLPMESH_CONTRACT_BASE=$NLPMESH_CONTRACT_BASE"
fi
if [ -z "$base" ]; then
  tag=$(git describe --tags --abbrev=0 --match 'v*' "$head^" 2>/dev/null || true)
  if [ -n "$tag" ]; then base=$(git rev-parse "$tag^{commit}"); why="the release tag $tag"; fi
fi
if [ -z "$base" ] && git rev-parse --verify -q main >/dev/null; then
  merge_base=$(git merge-base HEAD main)
  if [ "$merge_base" != "$head" ]; then base=$merge_base; why="the merge base with main"; fi
fi
if [ -z "$base" ]; then
  changed=$(git log -1 --format=%H -- protos)
  if [ -n "$changed" ] && git rev-parse --verify -q "$changed^" >/dev/null; then
    base=$(git rev-parse "$changed^"); why="the commit before the newest change to protos/"
  fi
fi
if [ -z "$base" ] || ! git cat-file -e "$base:protos" 2>/dev/null; then
  echo "[contract] no earlier protos/ in the history: buf breaking skipped"
  exit 0
fi

against=$(mktemp -d)
trap 'rm -rf "$against"' EXIT
git archive "$base" protos | tar -x -C "$against"
"$BUF" breaking --against "$against/protos"
echo "[contract] buf breaking: nothing breaks against ${base:0:12} ($why)"
