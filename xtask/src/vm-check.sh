# shellcheck shell=sh
# shellcheck disable=SC2154 # the variables vm-test sets above this text (see below)
# vm-test's check of the appliance from the inside, the one place for it: piped over SSH
# (`sh -s`) on the boots vm-test logs into, and, for a boot that has no SSH session, passed
# in as a systemd credential and run by vm-test-check.service once the appliance says it is
# ready (mkosi's check-and-shutdown pattern; the unit then powers the VM off). The same
# text both ways. Ends with one line, "vm-test-check: passed" or "vm-test-check: FAILED:
# <what>" (on the console: one line), never a secret; before it, "vm-test note: <what>"
# lines that are worth knowing but no failure (vm-test passes them on).
#
# Two parts. The system part runs on every boot: units, the stack's health, the immutable
# root and the grown /var, Podman's images, no route out, the machine ID, SSH, the
# containers' groups. The part after the update runs only when vm-test sets after_update
# (non-empty) and, with it, the values it needs: matrix_host, room, text (the first boot's
# message), identity_sha, upload_limit, stale_image (empty: not checked), version (the one
# that must run), previous (the OS image in the other root slot), failed (one that must be
# marked bad, or empty), telegram_api_hash, identity() (the same command as its SSH check) and
# journal_check() (vm-journal.sh). vm-test sets them above this text.

problems=
fail() { problems="$problems; $*"; }
# Lines as one line (the verdict is one console line).
oneline() { tr '\n' ' ' | sed 's/ *$//'; }
# The verdict, and the end of the check.
verdict() {
	if [ -z "$problems" ]; then
		echo "vm-test-check: passed"
		exit 0
	fi
	echo "vm-test-check: FAILED: ${problems#; }"
	exit 1
}

# ---- The system (every boot) ----------------------------------------------------------------

# Units: none failed but podman's health probes (transient units; one that timed out on a
# slow emulated machine stays failed while the next ones pass: the stack's health counts,
# below; those are noted).
probe='[systemd-run] /usr/bin/podman healthcheck run'
if units=$(systemctl list-units --failed --plain --no-legend); then
	failed_units=$(printf '%s' "$units" | grep -v -F "$probe" | cut -d' ' -f1 | oneline)
	[ -z "$failed_units" ] || fail "failed units: $failed_units"
	probes=$(printf '%s' "$units" | grep -c -F "$probe")
	[ "$probes" -eq 0 ] || echo "vm-test note: $probes failed health probe(s) (timed out)"
else
	fail "systemctl could not list the failed units"
fi
if ! status_errors=$(matrixctl status 2>&1 >/dev/null); then
	fail "matrixctl status says the stack is not healthy${status_errors:+: $(printf '%s' "$status_errors" | oneline)}"
fi
# Name resolution by DNS only: nothing answers LLMNR (5355) or mDNS (5353).
if listening=$(ss -Hlntu '( sport = :5355 or sport = :5353 )'); then
	[ -z "$listening" ] ||
		fail "something listens for LLMNR or multicast DNS: $(printf '%s' "$listening" | oneline)"
else
	fail "ss could not list the listening sockets"
fi

# Immutable root, /var grown.
root=$(findmnt -no FSTYPE,OPTIONS /)
printf '%s' "$root" | grep -Eq '^erofs +(ro|ro,.*)$' || fail "the root is not a read-only erofs: $root"
if touch /usr/.vm-test 2>/dev/null; then fail "/usr is writable"; fi
# The running version's appliance extension, read-only over /usr (laid by the initramfs).
usr=$(findmnt -no FSTYPE,OPTIONS /usr)
printf '%s' "$usr" | grep -Eq '^overlay +ro' ||
	fail "/usr is not the appliance extension laid over the root (a read-only overlay): $usr"
# The version booted: its boot entry names it on the kernel command line.
running=$(tr ' ' '\n' </proc/cmdline | sed -n 's/^appliance\.version=//p')
ext_version=$(sed -n 's/^IMAGE_VERSION=//p' /usr/lib/extension-release.d/extension-release.matrix-appliance 2>/dev/null)
[ -n "$running" ] || running='(none on the kernel command line)'
[ "$ext_version" = "$running" ] ||
	fail "the appliance extension over /usr is version ${ext_version:-none}, not the running ${running:-?}"
# /var a file system of its own on its partition, grown: 20 GiB less the ESP and the two 3 GiB
# root slots, about 13.5 GiB.
if var_mount=$(findmnt -no SOURCE,FSTYPE /var); then
	var_size=$(lsblk -bno SIZE /dev/disk/by-partlabel/var)
	[ "${var_size:-0}" -gt $((12 << 30)) ] ||
		fail "/var did not grow to fill the 20G disk ($(printf '%s' "$var_mount" | oneline): ${var_size:-?} bytes)"
else
	fail "/var is not a mount point"
fi

# Offline: only the appliance's own images (at least three), all in the OS's read-only image
# store (nothing loaded into /var), no OCI layout left on the disk; no route out.
images=$(podman images --format '{{.Repository}} {{.ReadOnly}}')
others=$(printf '%s' "$images" | grep -v '^localhost/matrix-appliance/.* true$' | oneline)
[ -z "$others" ] || fail "images not from the appliance's read-only image store: $others"
[ "$(printf '%s' "$images" | grep -c '')" -ge 3 ] ||
	fail "fewer than 3 images in Podman's store: $(printf '%s' "$images" | oneline)"
if [ -e /usr/share/matrix-appliance/images ] || [ -L /usr/share/matrix-appliance/images ]; then
	fail "the OCI layout is in the disk image (/usr/share/matrix-appliance/images)"
fi
if curl -sS --max-time 10 -o /dev/null https://deb.debian.org/ 2>/dev/null; then
	fail "the VM reached the internet"
fi

# The machine ID is the one kept in /var (not printed); only keys log in over SSH.
machine_id=$(cat /etc/machine-id)
if [ "${#machine_id}" -ne 32 ] || [ "$machine_id" != "$(cat /var/lib/appliance/machine-id)" ]; then
	fail "/etc/machine-id is not the machine ID kept in /var"
fi
[ "$(grep -c '^PasswordAuthentication no' /etc/ssh/sshd_config.d/appliance.conf)" = 1 ] ||
	fail "password login is not off"

# The containers' IDs are the appliance's own groups, and nothing under /var/lib/matrix is
# group-readable by a group the host has for another purpose (a group of no name is no host
# group).
groups=$(getent group 991 999 | cut -d: -f1,3 | sort | oneline)
[ "$groups" = "matrix-postgres:999 matrix-synapse:991" ] ||
	fail "the containers' group IDs are not the appliance's own groups: $groups"
readable=$(find /var/lib/matrix -perm -g=r ! -type l -printf '%g\n' | sort -u)
foreign=$(printf '%s' "$readable" | grep -v -x -E 'root|matrix-.*|[0-9]+' | oneline)
if [ -z "$readable" ] || [ -n "$foreign" ]; then
	fail "files under /var/lib/matrix are group-readable by host groups: ${foreign:-none} (all: $(printf '%s' "$readable" | oneline))"
fi

# The system only: done.
[ -n "$after_update" ] || verdict

# ---- After the update (vm-test gave its values) --------------------------------------------

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
# The machine's identity and secrets kept (compared by their hash).
[ "$( (identity) | sha256sum | cut -d' ' -f1)" = "$identity_sha" ] ||
	fail "the machine's identity, secrets or bridge registrations changed"
# The reboot left an older copy of one of the images in /var: its load unit removed it.
if [ -n "$stale_image" ]; then
	stale_unit=matrix-image-$(echo "$stale_image" | sed 's|.*/||; s|:.*||')-image.service
	journalctl -b -o cat -u "$stale_unit" | grep -q 'removing that copy' ||
		fail "$stale_unit did not remove the older copy of $stale_image in /var"
fi

# The update: this version runs from its own root slot, passed its health gate and is kept
# (UEFI: systemd-bless-boot took the tries out of its entry's name; both: GRUB's good
# version); the other slot holds the previous OS image; a failed version is marked
# bad for both boot loaders.
[ "$running" = "$version" ] || fail "version $running runs, not $version"
# shellcheck source=/dev/null # the image's os-release
os=$(. /etc/os-release && echo "$IMAGE_VERSION")
grep -q "root=PARTUUID=$(lsblk -rno PARTUUID,PARTLABEL | awk -v l="appliance_$os" '$2 == l {print $1}') " /proc/cmdline ||
	fail "the kernel's root is not the PARTUUID of slot appliance_$os: $(cat /proc/cmdline)"
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


verdict
