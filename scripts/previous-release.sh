#!/usr/bin/env bash
# Builds the previous release of orderflow, for the upgrade scenarios (tests/upgrade.rs): its
# source taken from this repository's history at the pinned commit (git archive, no checkout),
# built with its own Cargo.lock in a target directory of its own (target/previous/build, so this
# build's artifacts are left alone). Idempotent: a binary already built is kept. The LAST line of
# stdout is the binary's path; everything else goes to stderr.
#
#   bash scripts/previous-release.sh          # builds (a debug build, a few minutes cold)
#
# The pin is one release back and moves with each release (docs/UPGRADING.md): it names the
# commit of main from which the current round of work started.
#
# Exit 3, with a message, when the pinned commit is not in this clone (a shallow clone): the
# upgrade scenarios cannot run there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# main at the start of this round (2026-12-05): the release before the one that first runs
# beside its previous release (it cannot start on a newer schema itself).
readonly PIN=7e07758acc34f963d18f131ae1a223be8dae9664
readonly DIR=target/previous
readonly BIN=$DIR/orderflow-${PIN:0:12}

log() { printf '[previous-release] %s\n' "$*" >&2; }

if [[ -x $BIN ]]; then
  echo "$PWD/$BIN"
  exit 0
fi
if ! git cat-file -e "$PIN^{commit}" 2>/dev/null; then
  log "commit $PIN is not in this clone (shallow?): cannot build the previous release"
  exit 3
fi
src=$DIR/src-${PIN:0:12}
rm -rf "$src"
mkdir -p "$src"
git archive --format=tar "$PIN" | tar -x -C "$src"
log "building orderflow at ${PIN:0:12} (target $DIR/build)"
started=$SECONDS
CARGO_TARGET_DIR=$PWD/$DIR/build cargo build --locked --bin orderflow --manifest-path "$src/Cargo.toml" >&2
cp "$DIR/build/debug/orderflow" "$BIN"
rm -rf "$src"
log "built in $((SECONDS - started)) s: $BIN"
echo "$PWD/$BIN"
