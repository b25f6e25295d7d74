#!/bin/sh
# Export the three Postfix charts the recipes in docs/integrations/ were checked against
# into the cache tests/contract/test_integrations.py renders them from
# (~/.cache/mailtls/integrations/<name>-<commit12>/<chart>). Nothing of theirs enters this
# repository. Needs git and network (or existing clones):
#
#   sh tools/export-integration-charts.sh            # clones into a temporary directory
#   sh tools/export-integration-charts.sh DIR        # uses/creates clones under DIR
set -eu
CACHE=${MAILTLS_INTEGRATIONS_CACHE:-$HOME/.cache/mailtls/integrations}
WORK=${1:-$(mktemp -d)}
mkdir -p "$CACHE" "$WORK"

# name  repository  commit  chart-path
export_one() {
    name=$1 url=$2 commit=$3 path=$4
    clone="$WORK/$name.git"
    [ -d "$clone" ] || git clone --bare --filter=blob:none "$url" "$clone"
    git -C "$clone" cat-file -e "$commit^{commit}" 2>/dev/null || git -C "$clone" fetch origin "$commit"
    out="$CACHE/$name-$(echo "$commit" | cut -c1-12)"
    rm -rf "$out" && mkdir -p "$out"
    strip=$(echo "$path" | awk -F/ '{print NF-1}')
    git -C "$clone" archive "$commit" "$path" | tar -x -C "$out" --strip-components="$strip"
    echo "$out/$(basename "$path")"
}

export_one boky-mail https://github.com/bokysan/docker-postfix \
    a2687c54f9ad03b8858a31c676a9010d97da917d helm/mail
export_one docker-mailserver https://github.com/docker-mailserver/docker-mailserver-helm \
    f641031faace2fd13dbe4cfc9d8b9a70fbd1c77e charts/docker-mailserver
export_one mailu https://github.com/Mailu/helm-charts \
    8a59cb65ab0f704c5769749f8e90f41045c465a3 charts/mailu
