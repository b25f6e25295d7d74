#!/bin/sh
# Start Postfix in the foreground as PID 1: `postfix start-fg` first runs Postfix's
# integrity check (creating the missing queue directories), then execs master -i,
# which only works when it is PID 1, hence the exec here. Postfix logs to stdout
# through postlogd (maillog_file = /dev/stdout in main.cf). The operator later runs
# postmap, postfix reload and postconf in this container.
set -eu

# The queue and data directories are emptyDirs in the example pod, created
# world-writable; give them the owners and modes Postfix expects (and checks).
queue_directory=$(postconf -h queue_directory)
data_directory=$(postconf -h data_directory)
mail_owner=$(postconf -h mail_owner)
chown root:root "$queue_directory"
chmod 0755 "$queue_directory"
chown "$mail_owner:$mail_owner" "$data_directory"
chmod 0700 "$data_directory"

exec postfix start-fg
