# shellcheck shell=sh
# shellcheck disable=SC2154 # the variables vm-test sets above this text (see below)
# vm-test's check of the appliance from the inside, for a boot that has no SSH session:
# passed in as a systemd credential and run by vm-test-check.service once the appliance
# says it is ready (mkosi's check-and-shutdown pattern). Prints one line on the console,
# "vm-test-check: passed" or "vm-test-check: FAILED: <what>", never a secret; the unit then
# powers the VM off. vm-test sets, above this text: matrix_host, room, text, identity_sha,
# upload_limit, stale_image (empty: not checked), version (the one that must run),
# previous (the one installed beside it), failed (one that must be marked bad, or empty),
# telegram_api_hash, and defines identity() (the same command as its SSH check) and
# journal_check() (vm-journal.sh).

problems=
fail() { problems="$problems; $*"; }

# Units: none failed but podman's health probes (transient units; one that timed out on a
# slow emulated machine stays failed while the next ones pass: the stack's health counts).
failed=$(systemctl list-units --failed --plain --no-legend |
	grep -v -F '[systemd-run] /usr/bin/podman healthcheck run' | cut -d' ' -f1 | tr '\n' ' ')
[ -z "$failed" ] || fail "failed units: $failed"
matrixctl status >/dev/null 2>&1 || fail "matrixctl status says the stack is not healthy"
# Each first-boot step is loaded, its condition was checked in this boot, and it was skipped
# (a renamed or never-loaded unit must not pass for "not run again").
for step in secrets databases admin-user; do
	shown=$(systemctl show -p LoadState,ConditionResult,ConditionTimestampMonotonic \
		"matrix-firstboot-$step.service" | sort | tr '\n' ' ')
	case $shown in
	"ConditionResult=no ConditionTimestampMonotonic="[1-9]*" LoadState=loaded ") ;;
	*) fail "first-boot step $step was not checked and skipped in this boot: $shown" ;;
	esac
done

# Immutable root, /var grown, the machine's identity and secrets kept.
findmnt -no FSTYPE,OPTIONS / | grep -Eq '^erofs +(ro|ro,.*)$' || fail "the root is not a read-only erofs"
if touch /usr/.vm-test 2>/dev/null; then fail "/usr is writable"; fi
var_size=$(lsblk -bno SIZE /dev/disk/by-partlabel/var)
# 20 GiB less the ESP and the two 3 GiB root slots: about 13.5 GiB.
[ "${var_size:-0}" -gt $((12 << 30)) ] || fail "/var did not grow to fill the disk (${var_size:-?} bytes)"
[ "$(cat /etc/machine-id)" = "$(cat /var/lib/appliance/machine-id)" ] ||
	fail "/etc/machine-id is not the machine ID kept in /var"
[ "$( (identity) | sha256sum | cut -d' ' -f1)" = "$identity_sha" ] ||
	fail "the machine's identity, secrets or bridge registrations changed"

# Offline: only the appliance's own images, all from the OS's read-only image store; no
# route out.
others=$(podman images --format '{{.Repository}} {{.ReadOnly}}' |
	grep -v '^localhost/matrix-appliance/.* true$' | tr '\n' ' ')
[ -z "$others" ] || fail "images not from the appliance's read-only store: $others"
# The reboot left an older copy of one of them in /var: its load unit removed it.
if [ -n "$stale_image" ]; then
	stale_unit=matrix-image-$(echo "$stale_image" | sed 's|.*/||; s|:.*||')-image.service
	journalctl -b -o cat -u "$stale_unit" | grep -q 'removing that copy' ||
		fail "$stale_unit did not remove the older copy of $stale_image in /var"
fi
if curl -sS --max-time 10 -o /dev/null https://deb.debian.org/ 2>/dev/null; then
	fail "the VM reached the internet"
fi

# The update: this version runs from its own root slot, passed its health gate and is kept
# (UEFI: systemd-bless-boot took the tries out of its entry's name; both: GRUB's good
# version); the other slot holds the previous (or failed) version; a failed one is marked
# bad for both boot loaders.
# shellcheck source=/dev/null # the image's os-release
running=$(. /etc/os-release && echo "$IMAGE_VERSION")
[ "$running" = "$version" ] || fail "version $running runs, not $version"
grep -q "root=PARTUUID=$(lsblk -rno PARTUUID,PARTLABEL | awk -v l="appliance_$version" '$2 == l {print $1}') " /proc/cmdline ||
	fail "the kernel's root is not the PARTUUID of slot appliance_$version: $(cat /proc/cmdline)"
lsblk -rno PARTLABEL | grep -qx "appliance_$previous" || fail "the other slot is not appliance_$previous"
uefi=
[ ! -d /sys/firmware/efi ] || uefi=1
i=0
until systemctl is-active --quiet matrix-appliance-health.service &&
	{ [ -z "$uefi" ] || [ -e "/efi/EFI/Linux/appliance_$version.efi" ]; }; do
	i=$((i + 1))
	[ "$i" -lt 60 ] || break
	sleep 5
done
systemctl is-active --quiet matrix-appliance-health.service || fail "the health gate did not pass"
[ -z "$uefi" ] || [ -e "/efi/EFI/Linux/appliance_$version.efi" ] ||
	fail "$version was not kept for systemd-boot: $(cd /efi/EFI/Linux && echo *)"
grep -q "^appliance_good=$version\$" /efi/grub/grubenv || fail "GRUB's good version is not $version"
grep -q '^appliance_try=$' /efi/grub/grubenv || fail "a version is still on trial for GRUB"
if [ -n "$failed" ]; then
	grep -q "^appliance_bad=$failed\$" /efi/grub/grubenv || fail "$failed is not marked bad for GRUB"
	if [ -n "$uefi" ]; then
		ls /efi/EFI/Linux/appliance_"$failed"+0-*.efi >/dev/null 2>&1 ||
			fail "$failed is not marked bad for systemd-boot: $(cd /efi/EFI/Linux && echo *)"
	fi
	matrixctl update status | grep -q "failed=$failed" || fail "matrixctl update status does not name $failed as failed"
	# The same Synapse ran before and after: its database needed no restore.
	journalctl -b -o cat -u matrix-update-restore.service | grep -q 'nothing to restore' ||
		fail "matrix-update-restore.service did not find the database usable as it is"
fi

# Matrix through the proxy over TLS (trusting only the appliance's CA): the admin logs in
# and reads back the message of the first boot.
api() {
	curl -sS --fail --max-time 60 --cacert /var/lib/matrix/proxy/internal-ca.crt \
		--resolve "$matrix_host:443:127.0.0.1" "$@"
}
api "https://$matrix_host/_matrix/client/versions" | jq -e '.versions | length > 0' >/dev/null ||
	fail "/_matrix/client/versions does not answer through the proxy"
umask 077
auth=/run/vm-test-check.auth
jq -n --rawfile pw /var/lib/matrix/secrets/admin-password \
	'{type: "m.login.password", identifier: {type: "m.id.user", user: "admin"},
	  password: ($pw | rtrimstr("\n"))}' |
	api -X POST -H 'Content-Type: application/json' --data-binary @- \
		"https://$matrix_host/_matrix/client/v3/login" |
	jq -r '"Authorization: Bearer " + .access_token' >"$auth" 2>/dev/null
if grep -q 'Bearer .' "$auth" 2>/dev/null; then
	room_path=$(printf '%s' "$room" | sed 's/!/%21/; s/:/%3A/')
	api -H @"$auth" "https://$matrix_host/_matrix/client/v3/rooms/$room_path/messages?dir=b&limit=20" |
		jq -e --arg text "$text" 'any(.chunk[]; .content.body == $text)' >/dev/null ||
		fail "the first boot's message is not in its room"
	# This image's settings in use: Synapse itself says which upload limit it applies.
	case $upload_limit in
	*K) limit=$((${upload_limit%K} << 10)) ;;
	*M) limit=$((${upload_limit%M} << 20)) ;;
	*G) limit=$((${upload_limit%G} << 30)) ;;
	*) limit=$upload_limit ;;
	esac
	api -H @"$auth" "https://$matrix_host/_matrix/client/v1/media/config" |
		jq -e --argjson limit "$limit" '."m.upload.size" == $limit' >/dev/null ||
		fail "Synapse's upload limit is not $upload_limit ($limit bytes)"
else
	fail "the admin could not log in through the proxy"
fi
rm -f "$auth"

# No secret in the journal, of this boot or an earlier one (vm-journal.sh, above).
if ! journal=$(journal_check); then fail "$journal"; fi

if [ -z "$problems" ]; then
	echo "vm-test-check: passed"
else
	echo "vm-test-check: FAILED: ${problems#; }"
	exit 1
fi
