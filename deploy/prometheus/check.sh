#!/usr/bin/env bash
# Validate the llm-probe alerting rules and run their unit tests.
# Needs promtool (Debian/Ubuntu: `apt-get install prometheus`; or the Prometheus release tarball).
# Exits non-zero if the rules do not parse/lint or any test fails.
set -euo pipefail
cd "$(dirname "$0")"

if ! command -v promtool >/dev/null 2>&1; then
    echo "check.sh: promtool not found in PATH (apt-get install prometheus, or a Prometheus release)" >&2
    exit 127
fi

echo "+ promtool --version"
promtool --version | head -n 1

echo "+ promtool check rules llm-probe-rules.yml"
promtool check rules llm-probe-rules.yml

shopt -s nullglob
tests=(tests/*.yml)
if [ "${#tests[@]}" -eq 0 ]; then
    echo "check.sh: no test files under tests/" >&2
    exit 1
fi
echo "+ promtool test rules ${tests[*]}"
promtool test rules "${tests[@]}"

# Every runbook_url must point at a heading of docs/playbook.md (GitHub anchor: lowercase,
# punctuation dropped, spaces -> '-').
playbook=../../docs/playbook.md
echo "+ check runbook_url anchors against $playbook"
if [ ! -f "$playbook" ]; then
    echo "check.sh: $playbook not found" >&2
    exit 1
fi
anchors=$(grep -E '^#{1,6} ' "$playbook" | sed -E 's/^#+ +//' | tr '[:upper:]' '[:lower:]' \
    | sed -E 's/[^a-z0-9 _-]//g; s/ /-/g')
missing=0
n=0
while read -r anchor; do
    n=$((n + 1))
    if ! grep -qxF -- "$anchor" <<<"$anchors"; then
        echo "  runbook_url anchor #$anchor has no heading in $playbook" >&2
        missing=1
    fi
done < <(grep -oE 'playbook\.md#[A-Za-z0-9_-]+' llm-probe-rules.yml | sed 's/.*#//')
alerts=$(grep -cE '^ *- alert: ' llm-probe-rules.yml)
if [ "$n" -ne "$alerts" ]; then
    echo "  $alerts alerts but $n runbook_url annotations" >&2
    missing=1
fi
[ "$missing" -eq 0 ] || exit 1
echo "  SUCCESS: $n runbook anchors found"

echo "check.sh: rules valid, all tests passed, runbook links resolve"
