#!/usr/bin/env bash
# The Debian packages experiments/speech needs, apt-installed if missing (root, Debian 12):
#   espeak-ng, sox              synthesise the corpus (experiments/speech/prepare_synthetic.py)
#   pocketsphinx-testdata       ten real clips with transcripts for the smoke check (smoke_pocketsphinx.py)
#
#   bash scripts/speech_deps.sh            # install what is missing; prints nothing to do otherwise
#   bash scripts/speech_deps.sh --check    # exit 1 (and name them) if any is missing; install nothing
set -euo pipefail
log() { printf '[speech_deps] %s\n' "$*" >&2; }
need=()
command -v espeak-ng >/dev/null || need+=(espeak-ng)
command -v sox >/dev/null || need+=(sox)
[ -f /usr/share/pocketsphinx/test/data/cards/cards.transcription ] || need+=(pocketsphinx-testdata)
if [ ${#need[@]} -eq 0 ]; then
    log "espeak-ng, sox and pocketsphinx-testdata are installed; nothing to do"
    exit 0
fi
if [ "${1:-}" = "--check" ]; then
    log "missing: ${need[*]} (install with: apt-get install ${need[*]})"
    exit 1
fi
[ "$(id -u)" = 0 ] || { log "error: missing ${need[*]}; run as root, or: sudo apt-get install ${need[*]}"; exit 1; }
log "apt-get install ${need[*]}"
apt-get update -qq >/dev/null
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
log "installed ${need[*]}"
