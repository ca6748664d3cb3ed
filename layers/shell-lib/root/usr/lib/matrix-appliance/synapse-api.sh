# shellcheck shell=sh
# Synapse's HTTP API, as matrix-firstboot and matrixctl talk to it. The sourcing script sets
# synapse_url, synapse_exec (a command prefix that runs curl where Synapse is reachable,
# possibly empty) and nl (a newline), and has sourced messages.sh.
#
#   synapse_request METHOD PATH [JSON]   one request; the bearer token is $api_token when
#                       set. Sets api_status (HTTP status) and api_body. Returns 1 if Synapse
#                       could not be reached. The URL, token and body reach curl on its
#                       standard input (--config -), never as arguments.
#   synapse_login JSON  POST /login with JSON (the caller's, holding the password); while
#                       Synapse answers 429 (rc_login: by default 5 logins, then about one
#                       per 6 minutes per address and per account), waits as long as it asks
#                       and tries again, up to 600 s in all (login_waited). Returns 1 if
#                       Synapse could not be reached; api_status says the rest (429 still:
#                       the wait ran out).
#   curl_quote STRING   the body of a double-quoted curl --config parameter
#   api_error           "ERRCODE: message" of the last response (only called on errors)

# shellcheck disable=SC2154 # synapse_url, synapse_exec, nl: set by the script

curl_quote() { printf '%s' "$1" | sed -e 's/\\/\\\\/g' -e 's/"/\\"/g'; }

synapse_request() {
	_resp=$(
		{
			printf 'url = "%s"\n' "$(curl_quote "$synapse_url$2")"
			printf 'request = "%s"\n' "$1"
			if [ -n "${api_token-}" ]; then
				printf 'header = "Authorization: Bearer %s"\n' "$(curl_quote "$api_token")"
			fi
			if [ -n "${3-}" ]; then
				printf 'header = "Content-Type: application/json"\n'
				printf 'data-raw = "%s"\n' "$(curl_quote "$3")"
			fi
		} | $synapse_exec curl --silent --show-error --connect-timeout 10 --max-time 120 \
			--write-out '\n%{http_code}' --config -
	) || return 1
	api_status=${_resp##*"$nl"}
	api_body=${_resp%"$nl"*}
}

synapse_login() {
	login_waited=0
	while :; do
		synapse_request POST /_matrix/client/v3/login "$1" || return 1
		[ "$api_status" = 429 ] || return 0
		_ms=$(printf '%s' "$api_body" | jq -r '.retry_after_ms // 10000' 2>/dev/null || echo 10000)
		_s=$(((_ms + 999) / 1000))
		[ $((login_waited + _s)) -le 600 ] || return 0
		warn "login rate limited by Synapse: retrying in ${_s}s"
		sleep "$_s"
		login_waited=$((login_waited + _s))
	done
}

api_error() {
	# shellcheck disable=SC2154 # api_body, api_status: set by the script's request function
	printf '%s' "$api_body" | jq -r '"\(.errcode // "?"): \(.error // "no error message")"' 2>/dev/null ||
		printf 'HTTP %s' "$api_status"
}
