# shellcheck shell=sh
# Messages, the same in every script of the appliance. Source it after setting prog, the
# name every message starts with ("matrixctl update", "matrix-firstboot", ...).
#
#   say MESSAGE...        stdout: "$prog: MESSAGE" (just MESSAGE when the script set
#                         say_bare=1: matrixctl's subcommands talk to a person)
#   warn MESSAGE...       stderr: "$prog: MESSAGE"
#   die STATUS MESSAGE    stderr: "$prog: MESSAGE", then exit STATUS
#   usage_error MESSAGE   stderr: "$prog: MESSAGE" and, for matrixctl's commands, where the
#                         help is; exit 2
#   announce MESSAGE...   say, and "matrix-appliance: MESSAGE" on the console: during an
#                         update, or after a failed backup, an admin may have nothing else

: "${prog:?set prog before sourcing messages.sh}"

say() {
	if [ "${say_bare:-0}" = 1 ]; then
		printf '%s\n' "$*"
	else
		printf '%s: %s\n' "$prog" "$*"
	fi
}
warn() { printf '%s: %s\n' "$prog" "$*" >&2; }
die() {
	warn "$2"
	exit "$1"
}
usage_error() {
	warn "$1"
	case $prog in
	matrixctl*) printf "Try 'matrixctl --help'.\n" >&2 ;;
	esac
	exit 2
}
announce() {
	say "$*"
	if [ -w /dev/console ]; then printf 'matrix-appliance: %s\n' "$*" >/dev/console 2>/dev/null || true; fi
}
