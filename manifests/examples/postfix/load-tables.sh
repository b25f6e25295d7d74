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
# Keys the operator may write: tls_policy, transport (data), and tls_policy.gz,
# transport.gz (binaryData: tables over ~900 KiB are stored gzip-compressed).
set -eu

SRC=${SRC:-/etc/mailtls}
DST=${DST:-/var/lib/mailtls}
MAP_TYPE=${MAP_TYPE:-lmdb}
# postmap reads main.cf (lmdb_map_size, ...); POSTFIX_CONFIG selects the directory.
POSTFIX_CONFIG=${POSTFIX_CONFIG:-/etc/postfix}

umask 022
for table in tls_policy transport; do
    tmp="$DST/.$table.new"
    if [ -f "$SRC/$table.gz" ]; then
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
