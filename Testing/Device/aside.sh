#!/usr/bin/env bash
# Move tracked files out of the tree for a device call (whose tree and carried paths may total 64 MiB)
# and back right after it. Used by gpu_train.sh and gpu_bench.sh.
#
#   Testing/Device/aside.sh aside PATH...     # PATHs (files or folders) -> /tmp/xctdiff-aside
#   Testing/Device/aside.sh restore PATH...   # and back; the aside folder is removed once empty
set -uo pipefail
cd "$(dirname "$0")/../.."
ASIDE=/tmp/xctdiff-aside
mode=${1:-}; shift || true
case "$mode" in
aside)
  [ -e $ASIDE ] && { echo "$ASIDE exists: run restore first" >&2; exit 1; }
  for f in "$@"; do mkdir -p $ASIDE/$(dirname $f) && mv -T $f $ASIDE/$f; done ;;
restore)
  for f in "$@"; do if [ -e $ASIDE/$f ]; then rmdir $f 2>/dev/null; mv -T $ASIDE/$f $f; fi; done
  [ -z "$(find $ASIDE -type f 2>/dev/null)" ] && rm -rf $ASIDE; git status --short ;;
*) echo "usage: $0 aside|restore PATH..." >&2; exit 2 ;;
esac
