#!/bin/sh
# Entrypoint of the local PostgreSQL image, for the environment the official image reads:
#   PGDATA                  the cluster (default /var/lib/postgresql/data)
#   POSTGRES_PASSWORD_FILE  the superuser's password (first line), read as root, so the file
#                           may stay root-only (0600); or POSTGRES_PASSWORD itself
#   POSTGRES_INITDB_ARGS    extra initdb arguments (split on spaces), for a new cluster only
#
# `postgres [ARGS...]` (the default command; a first argument starting with "-" means the
# same): started as root, it creates PGDATA (0700) and /run/postgresql for the postgres user
# and gives it anything in PGDATA it does not own. On an empty PGDATA it runs initdb as
# postgres with the password and POSTGRES_INITDB_ARGS, listening on all addresses. At every
# start it makes sure pg_hba.conf lets any host in with a password (SCRAM), then it becomes
# the server (exec, as postgres): signals (SIGINT = fast shutdown) reach it directly.
#
# Anything else runs as given: `podman exec matrix-postgres psql ...`, `pg_isready`.
#
# No temporary server, no init scripts, no extra user or database: the stack's own tools
# create roles and databases once the server runs.

set -eu

prog=${0##*/}
die() {
	printf '%s: %s\n' "$prog" "$1" >&2
	exit 1
}

case ${1:-} in
-*) set -- postgres "$@" ;;
esac
if [ "${1:-}" != postgres ]; then
	exec "$@"
fi
# `postgres --help`, `--version`, `--describe-config`, `-C name`: no setup needed.
for arg; do
	case $arg in
	-'?' | --help | -V | --version | --describe-config | -C) exec "$@" ;;
	esac
done

PGDATA=${PGDATA:-/var/lib/postgresql/data}
export PGDATA
hba_line='host all all all scram-sha-256'

# A cluster of another major: PostgreSQL itself would refuse to start on it. Say plainly why
# and what to do, before touching anything in it, and never initialise a cluster in its place.
if [ -s "$PGDATA/PG_VERSION" ]; then
	theirs=$(cat "$PGDATA/PG_VERSION")
	ours=$(postgres --version | sed -n 's/^postgres (PostgreSQL) \([0-9]*\).*/\1/p')
	if [ -n "$ours" ] && [ "$theirs" != "$ours" ]; then
		die "$PGDATA holds a PostgreSQL $theirs cluster and this is PostgreSQL $ours: not starting on it, and nothing is initialised over it. Its data is intact: go back to the version that ran it (matrixctl update rollback), then see the README's \"PostgreSQL major versions\""
	fi
fi

if [ "$(id -u)" = 0 ]; then
	# The mount point's owner and mode are set by the host; fix what can be fixed.
	mkdir -p "$PGDATA" /run/postgresql
	chmod 0700 "$PGDATA"
	find "$PGDATA" ! -user postgres -exec chown postgres:postgres {} +
	chown postgres:postgres /run/postgresql
	chmod 2775 /run/postgresql
	as_postgres() { setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"; }
else
	as_postgres() { "$@"; }
fi

if ! [ -s "$PGDATA/PG_VERSION" ]; then
	if [ -n "$(ls -A "$PGDATA")" ]; then
		die "$PGDATA is neither empty nor a PostgreSQL cluster (no PG_VERSION): refusing to touch it"
	fi
	# The password reaches initdb through a pipe, opened here (possibly as root) on fd 3:
	# never an argument, the server's environment, or a file postgres could read. The pipe
	# is made by a shell already running as postgres, since initdb reopens /dev/stdin.
	if [ -n "${POSTGRES_PASSWORD_FILE:-}" ]; then
		[ -r "$POSTGRES_PASSWORD_FILE" ] || die "cannot read POSTGRES_PASSWORD_FILE $POSTGRES_PASSWORD_FILE"
		[ -s "$POSTGRES_PASSWORD_FILE" ] || die "POSTGRES_PASSWORD_FILE $POSTGRES_PASSWORD_FILE is empty"
		exec 3<"$POSTGRES_PASSWORD_FILE"
	elif [ -n "${POSTGRES_PASSWORD:-}" ]; then
		exec 3<<EOF
$POSTGRES_PASSWORD
EOF
	else
		die "a new cluster needs a superuser password: set POSTGRES_PASSWORD_FILE (or POSTGRES_PASSWORD)"
	fi
	printf '%s: initializing a new cluster in %s\n' "$prog" "$PGDATA" >&2
	# initdb takes the first line of --pwfile. POSTGRES_INITDB_ARGS is split on blanks, as
	# the official image does. A failed initdb removes what it made.
	# shellcheck disable=SC2016,SC2086
	as_postgres sh -c 'head -n 1 <&3 | initdb --pwfile=/dev/stdin "$@"' initdb \
		--username=postgres --no-instructions --set "listen_addresses=*" ${POSTGRES_INITDB_ARGS:-}
	exec 3<&-
fi
unset POSTGRES_PASSWORD

# Password logins from the containers of the network. Also after an interrupted first start
# (killed between initdb and here); never appended twice.
if ! grep -qxF "$hba_line" "$PGDATA/pg_hba.conf"; then
	# shellcheck disable=SC2016 # $PGDATA is expanded by the inner shell
	printf '\n# Added by the image: any host, with a password (SCRAM).\n%s\n' "$hba_line" |
		as_postgres sh -c 'cat >>"$PGDATA/pg_hba.conf"'
fi

if [ "$(id -u)" = 0 ]; then
	exec setpriv --reuid=postgres --regid=postgres --init-groups -- "$@"
fi
exec "$@"
