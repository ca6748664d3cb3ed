# shellcheck shell=sh
# shellcheck disable=SC2154 # telegram_api_hash: set by vm-test above this text
# vm-test's journal check, run inside the appliance on every boot of the test (over SSH, and
# as part of vm-check.sh on the boots that check themselves). Prints "journal: ok (N
# secrets, M entries)" or "journal: FAILED: <what>", never a secret itself; exit 0 or 1.
#
# First it proves that the containers' logs reach the journal at all (a check that found no
# secret in an empty journal would prove nothing): PostgreSQL's and Synapse's start-up
# lines, and at least one line from every other running container. Then no secret the
# appliance generated (every file under the secrets directories: the admin's, database and
# bridge passwords, hs/as tokens, macaroon, form and registration secrets, the signing key,
# matrixctl's token) and none given at build time (the Telegram API hash) is in it.

journal_check() {
	jdir=$(mktemp -d)
	# Every entry of every boot the journal keeps, message text only.
	if ! journalctl --no-pager -o cat >"$jdir/all"; then
		echo "journal: FAILED: journalctl could not read the journal"
		rm -rf "$jdir"
		return 1
	fi
	problems=
	for known in "matrix-postgres:ready to accept connections" "matrix-synapse:now listening on"; do
		name=${known%%:*}
		if ! journalctl --no-pager -b -o cat CONTAINER_NAME="$name" | grep -q -F "${known#*:}"; then
			problems="$problems; no '${known#*:}' from $name in this boot's journal"
		fi
	done
	for name in $(podman ps --format '{{.Names}}'); do
		if [ -z "$(journalctl --no-pager -b -o cat CONTAINER_NAME="$name" | head -n 1)" ]; then
			problems="$problems; nothing from the running container $name in this boot's journal"
		fi
	done
	# The secret part of each line: the last field split on blanks and colons (a pgpass
	# line's password, a signing key's key), if it is long enough to be one.
	m=/var/lib/matrix
	find $m/secrets $m/synapse/secrets $m/bridges/*/secrets $m/backup/key $m/backup/remote.key \
		$m/proxy/internal-ca/ca.key $m/proxy/tls/*.key -type f 2>/dev/null | while read -r f; do
		awk -F'[: \t]+' 'length($NF) >= 16 { print $NF }' "$f"
	done >"$jdir/patterns"
	printf '%s\n' "$telegram_api_hash" >>"$jdir/patterns"
	secrets=$(wc -l <"$jdir/patterns")
	if [ "$secrets" -lt 10 ]; then
		problems="$problems; only $secrets secrets found to look for"
	fi
	found=$(grep -c -F -f "$jdir/patterns" "$jdir/all")
	case $? in
	0) problems="$problems; $found journal entries hold a secret" ;;
	1) ;;
	*) problems="$problems; grep failed on the journal" ;;
	esac
	entries=$(wc -l <"$jdir/all")
	rm -rf "$jdir"
	if [ -n "$problems" ]; then
		echo "journal: FAILED: ${problems#; }"
		return 1
	fi
	echo "journal: ok ($secrets secrets looked for in $entries entries)"
}
