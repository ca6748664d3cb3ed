# shellcheck shell=sh
# Certificate files for the proxies that serve files (nginx, Traefik with tls_mode=internal),
# and the checks every proxy's certificate step makes. The sourcing script sets, and has
# sourced messages.sh for say and die:
#   tls        where the served certificates are (ROLE.crt + ROLE.key)
#   ca_dir     the private CA's key and certificate (ca.key, ca.crt)
#   public_ca  the world-readable copy of the CA certificate, for clients
#   work       a scratch directory of its own
#   MATRIX_HOST  (from the rendered settings) named in the CA's name
#
#   usable CRT KEY HOST   both there, the key is the certificate's, it names HOST, not expired
#   names_host CRT HOST   the certificate names HOST (subjectAltName)
#   fresh CRT             more than a third of its lifetime left
#   from_private_ca CRT   issued by the private CA
#   expiry CRT            its notAfter date
#   install_pair ROLE CRT KEY   replaces tls/ROLE.{crt,key}
#   newkey FILE           a new P-256 key
#   private_ca            makes the CA if it is missing or has less than 30 days left
#   from_ca ROLE HOST     a certificate for HOST from the private CA, installed as ROLE

# shellcheck disable=SC2154 # tls, ca_dir, public_ca, work, MATRIX_HOST: set by the script

# usable CRT KEY HOST: both files there, the key is the certificate's, the certificate
# names HOST (subjectAltName) and has not expired.
usable() {
	[ -s "$1" ] && [ -s "$2" ] || return 1
	a=$(openssl x509 -noout -pubkey -in "$1" 2>/dev/null) || return 1
	b=$(openssl pkey -pubout -in "$2" 2>/dev/null) || return 1
	[ "$a" = "$b" ] || return 1
	names_host "$1" "$3" && openssl x509 -noout -checkend 0 -in "$1" >/dev/null 2>&1
}

names_host() {
	openssl x509 -noout -ext subjectAltName -in "$1" 2>/dev/null |
		tr ',' '\n' | sed 's/^[[:space:]]*//' | grep -qxF "DNS:$2"
}

# fresh CRT: more than a third of the certificate's lifetime is left (Let's Encrypt's advice,
# and lego's own default).
fresh() {
	nb=$(openssl x509 -noout -startdate -in "$1") || return 1
	na=$(openssl x509 -noout -enddate -in "$1") || return 1
	start=$(date -u -d "${nb#notBefore=}" +%s) && end=$(date -u -d "${na#notAfter=}" +%s) || return 1
	openssl x509 -noout -checkend "$(((end - start) / 3))" -in "$1" >/dev/null
}

from_private_ca() {
	[ -s "$ca_dir/ca.crt" ] && openssl verify -CAfile "$ca_dir/ca.crt" "$1" >/dev/null 2>&1
}

expiry() { openssl x509 -noout -enddate -in "$1" | sed 's/^notAfter=//'; }

# install_pair ROLE CRT KEY: replace tls/ROLE.{crt,key} (each by rename, key first).
install_pair() {
	cp "$3" "$tls/.$1.key.new" && mv -f "$tls/.$1.key.new" "$tls/$1.key"
	cp "$2" "$tls/.$1.crt.new" && mv -f "$tls/.$1.crt.new" "$tls/$1.crt"
}

newkey() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

private_ca() {
	if [ -s "$ca_dir/ca.key" ] && [ -s "$ca_dir/ca.crt" ] &&
		openssl x509 -noout -checkend 2592000 -in "$ca_dir/ca.crt" >/dev/null 2>&1; then
		:
	else
		newkey "$work/ca.key"
		openssl req -x509 -new -key "$work/ca.key" -out "$work/ca.crt" -days 3650 \
			-subj "/O=Matrix appliance/CN=Matrix appliance private CA for $MATRIX_HOST" \
			-addext "basicConstraints=critical,CA:TRUE,pathlen:0" \
			-addext "keyUsage=critical,keyCertSign,cRLSign" 2>/dev/null ||
			die 1 "could not make the private CA"
		mv -f "$work/ca.key" "$ca_dir/ca.key"
		mv -f "$work/ca.crt" "$ca_dir/ca.crt"
		say "made a new private CA (valid 10 years)"
	fi
	if ! cmp -s "$ca_dir/ca.crt" "$public_ca"; then
		cp "$ca_dir/ca.crt" "$work/public" && chmod 0644 "$work/public" && mv -f "$work/public" "$public_ca"
	fi
}

from_ca() { # ROLE HOST
	private_ca
	newkey "$work/key"
	openssl req -x509 -new -key "$work/key" -out "$work/crt" -days 397 \
		-CA "$ca_dir/ca.crt" -CAkey "$ca_dir/ca.key" -subj "/CN=$2" \
		-addext "subjectAltName=DNS:$2" -addext "basicConstraints=critical,CA:FALSE" \
		-addext "keyUsage=critical,digitalSignature" -addext "extendedKeyUsage=serverAuth" 2>/dev/null ||
		die 1 "could not issue a certificate for $2 from the private CA"
	install_pair "$1" "$work/crt" "$work/key"
	say "$2: certificate from the private CA, valid until $(expiry "$tls/$1.crt")"
}
