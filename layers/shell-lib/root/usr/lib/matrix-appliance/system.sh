# shellcheck shell=sh
# The machine: its clock and its units.
#
#   now                  the time, UTC, as 2026-01-31T12:00:00Z (for records)
#   units ACTION UNIT... systemctl, or nothing when the script set systemctl empty (tests
#                        that run without systemd)
#   pull_problem UNIT    when UNIT's recent log says Podman could not pull an image: one line
#                        naming the image, its registry, Podman's error and what to do;
#                        otherwise nothing

now() { date -u +%Y-%m-%dT%H:%M:%SZ; }

units() {
	# shellcheck disable=SC2154 # the sourcing script sets systemctl
	[ -z "$systemctl" ] || $systemctl "$@"
}

pull_problem() {
	# Podman: "Error: initializing source docker://IMAGE: CAUSE" (no route, no DNS, rate
	# limits, a missing tag or a refused login alike).
	_pull=$(journalctl --unit="$1" --lines=200 --output=cat --no-pager 2>/dev/null |
		grep -F 'Error: initializing source docker://' | tail -n 1)
	[ -n "$_pull" ] || return 0
	_pull=${_pull#*docker://}
	_image=${_pull%%: *}
	_cause=${_pull#*: }
	# A reference's first part is its registry when it looks like a host; else Docker Hub.
	case ${_image%%/*} in
	*.* | *:* | localhost) _registry=${_image%%/*} ;;
	*) _registry=docker.io ;;
	esac
	printf 'cannot pull %s from %s: %s; it needs a route to %s (and DNS), or a build with this image embedded (offline = true, or the image built locally or taken from an archive)\n' \
		"$_image" "$_registry" "$_cause" "$_registry"
}
