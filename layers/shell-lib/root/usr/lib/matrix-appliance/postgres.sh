# shellcheck shell=sh
# PostgreSQL as its superuser, through the command prefix in pg_exec (default: in the
# running container), which the sourcing script sets.
#
#   psql_su DATABASE SQL   the result, one value a line, no headers; fails on any error
#   user_databases         the databases of the stack (all but templates and postgres), sorted
#   databases_size         the size of all databases together, in bytes

psql_su() {
	# shellcheck disable=SC2086,SC2154 # pg_exec: a command prefix the script sets, split on purpose
	$pg_exec psql --username=postgres --dbname="$1" --no-psqlrc --tuples-only --no-align \
		-v ON_ERROR_STOP=1 -c "$2"
}

user_databases() {
	psql_su postgres "SELECT datname FROM pg_database WHERE NOT datistemplate AND datname <> 'postgres' ORDER BY 1"
}

databases_size() { psql_su postgres "SELECT sum(pg_database_size(datname)) FROM pg_database"; }
