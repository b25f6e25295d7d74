#!/bin/sh
# Init container of the example Postfix pod: load the tables the operator published in
# the ConfigMap <instance>-mailtls (mounted read-only at $SRC) into the writable
# directory Postfix reads them from ($DST, the pod's mailtls.io/map-path directory),
# and compile them with postmap. Runs before Postfix starts, so a new or restarted pod
# starts with the current revision; afterwards the operator updates $DST in place.
#
# Both tables are always created, empty when absent: main.cf names them, and Postfix
# defers ALL mail while a table it names is missing. The ConfigMap is optional: on
# the very first start the operator may not have written it yet.
#
# The shapes the operator writes, per table (tls_policy, transport):
#   <table>            data: the text (the usual case, up to ~900 KiB);
#   <table>.gz         binaryData: the text gzip-compressed (past ~900 KiB);
#   <table>.gz.chunks  data: a manifest ("chunks: N", "sha256: HEX", one
#                      "chunk: NNN <configmap>" line per chunk) for a table too large
#                      for one ConfigMap even compressed: its gzip is cut into chunks
#                      <table>.gz.000, .001, ... held by the part ConfigMaps
#                      <instance>-mailtls-part-1 ... -N. They are read from $SRC or
#                      from $PARTS (where the example mounts the parts), concatenated
#                      in order, checked against the sha256 and gunzipped.
# A sha256 mismatch means the ConfigMaps are from different revisions (the operator
# is writing them right now): the script fails, the kubelet runs it again a little
# later with the volumes refreshed, and nothing half-loaded ever goes live.
set -eu

SRC=${SRC:-/etc/mailtls}
PARTS=${PARTS:-/etc/mailtls-parts}
DST=${DST:-/var/lib/mailtls}
MAP_TYPE=${MAP_TYPE:-lmdb}
# postmap reads main.cf (lmdb_map_size, ...); POSTFIX_CONFIG selects the directory.
POSTFIX_CONFIG=${POSTFIX_CONFIG:-/etc/postfix}

fail() {
    echo "mailtls: $*" >&2
    exit 1
}

cleanup() {
    for t in tls_policy transport; do
        rm -f "$DST/.$t.new" "$DST/.$t.new.gz" "$DST/.$t.new.$MAP_TYPE"
    done
}
trap cleanup EXIT

# The field $2 of the manifest $1 ("name: value" lines).
field() {
    sed -n "s/^$2: *//p" "$1" | head -n 1
}

# Join the chunks of table $1 named by its manifest into the gzip file $2.
join_chunks() {
    manifest="$SRC/$1.gz.chunks"
    count=$(field "$manifest" chunks)
    sha=$(field "$manifest" sha256)
    case $count in
        '' | *[!0-9]*) fail "$manifest: no chunk count" ;;
    esac
    : > "$2"
    i=0
    while [ "$i" -lt "$count" ]; do
        index=$(printf '%03d' "$i")
        chunk="$1.gz.$index"
        if [ -f "$SRC/$chunk" ]; then
            cat "$SRC/$chunk" >> "$2"
        elif [ -f "$PARTS/$chunk" ]; then
            cat "$PARTS/$chunk" >> "$2"
        else
            where=$(sed -n "s/^chunk: $index *//p" "$manifest" | head -n 1)
            fail "$chunk (chunk $((i + 1)) of $count, in ConfigMap ${where:-?}) is in" \
                 "neither $SRC nor $PARTS: mount every part ConfigMap of the instance" \
                 "(or the operator is still writing them: retry)"
        fi
        i=$((i + 1))
    done
    got=$(sha256sum < "$2" | cut -d ' ' -f 1)
    [ "$got" = "$sha" ] || fail "$1: the $count chunks have sha256 $got, the manifest" \
        "says ${sha:-nothing}: the ConfigMaps are from different revisions (the operator" \
        "is writing them: retry)"
}

umask 022
for table in tls_policy transport; do
    tmp="$DST/.$table.new"
    if [ -f "$SRC/$table.gz.chunks" ]; then
        join_chunks "$table" "$tmp.gz"
        gzip -dc "$tmp.gz" > "$tmp"
        rm -f "$tmp.gz"
        from="$SRC/$table.gz.chunks ($count chunks)"
    elif [ -f "$SRC/$table.gz" ]; then
        gzip -dc "$SRC/$table.gz" > "$tmp"
        from="$SRC/$table.gz"
    elif [ -f "$SRC/$table" ]; then
        cat "$SRC/$table" > "$tmp"
        from="$SRC/$table"
    else
        : > "$tmp"
        from="(none: empty table)"
    fi
    # Compile under the temporary name, then move the database and the text into
    # place: Postfix never sees a half-written table.
    postmap -c "$POSTFIX_CONFIG" "$MAP_TYPE:$tmp"
    for suffix in ".$MAP_TYPE" ""; do
        [ -e "$tmp$suffix" ] && mv -f "$tmp$suffix" "$DST/$table$suffix"
    done
    revision=$(sed -n 's/^# revision: *//p' "$DST/$table" | head -n 1)
    echo "mailtls: loaded $table from $from${revision:+ (revision $revision)}"
done
