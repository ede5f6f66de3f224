#!/bin/sh
# Makes a local certificate authority and a server certificate signed by it, for TLS in local
# clusters and tests (nginx in docker-compose.yml, wss:// test clients). Not for production:
# there, use certificates from your real CA.
#
#     sh deploy/tls/make-certs.sh [DIR]        (DIR defaults to deploy/tls/certs)
#
# Writes, in DIR:
#   ca.crt      the CA certificate: what clients trust (curl --cacert, a client's root store)
#   ca.key      the CA's private key (mode 0600)
#   server.crt  the server certificate, for localhost, 127.0.0.1 and ::1 (plus EXTRA_SANS)
#   server.key  its private key (mode 0600)
#   server.san  the subjectAltName the server certificate was made for
#
# Environment:
#   EXTRA_SANS  more names, comma-separated, e.g. "DNS:push.test,IP:192.0.2.10"
#   CERT_DAYS   lifetime of the server certificate in days (default 825)
#
# Idempotent: an existing CA is kept while it is valid for 30 more days, and an existing server
# certificate is kept while it was issued by that CA for the same names, matches its key and is
# valid for 30 more days. Anything else is made anew. Keys are ECDSA P-256. Plain POSIX sh and
# the openssl command line only, so it also runs in a minimal container.
set -eu

dir="${1:-$(dirname "$0")/certs}"
days="${CERT_DAYS:-825}"
sans="DNS:localhost,IP:127.0.0.1,IP:::1"
if [ -n "${EXTRA_SANS:-}" ]; then
  sans="$sans,$EXTRA_SANS"
fi
month=2592000 # 30 days, in seconds

command -v openssl >/dev/null 2>&1 || {
  echo "make-certs.sh: openssl is required" >&2
  exit 1
}
mkdir -p "$dir"

work="$(mktemp -d "$dir/.make-certs.XXXXXX")"
trap 'rm -rf "$work"' EXIT
trap 'exit 1' INT TERM

cat >"$work/openssl.cnf" <<EOF
[req]
distinguished_name = dn
prompt = no

[dn]
CN = pushgate

[ca_ext]
basicConstraints = critical,CA:TRUE,pathlen:0
keyUsage = critical,keyCertSign,cRLSign
subjectKeyIdentifier = hash

[server_ext]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = $sans
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
EOF

new_key() {
  (umask 077 && openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null)
}

# The certificate in $1 belongs to the key in $2.
key_matches() {
  [ "$(openssl x509 -in "$1" -noout -pubkey 2>/dev/null)" = \
    "$(openssl pkey -in "$2" -pubout 2>/dev/null)" ]
}

ca_ok() {
  [ -s "$dir/ca.crt" ] && [ -s "$dir/ca.key" ] &&
    openssl x509 -in "$dir/ca.crt" -noout -checkend "$month" >/dev/null 2>&1 &&
    key_matches "$dir/ca.crt" "$dir/ca.key"
}

server_ok() {
  [ -s "$dir/server.crt" ] && [ -s "$dir/server.key" ] && [ -s "$dir/server.san" ] &&
    [ "$(cat "$dir/server.san")" = "$sans" ] &&
    openssl verify -CAfile "$dir/ca.crt" "$dir/server.crt" >/dev/null 2>&1 &&
    openssl x509 -in "$dir/server.crt" -noout -checkend "$month" >/dev/null 2>&1 &&
    key_matches "$dir/server.crt" "$dir/server.key"
}

made=""
if ! ca_ok; then
  new_key "$work/ca.key"
  openssl req -x509 -new -config "$work/openssl.cnf" -extensions ca_ext -sha256 -days 3650 \
    -key "$work/ca.key" -subj "/CN=pushgate local CA" -out "$work/ca.crt"
  mv -f "$work/ca.key" "$dir/ca.key"
  mv -f "$work/ca.crt" "$dir/ca.crt"
  # A new CA invalidates the server certificate.
  rm -f "$dir/server.crt"
  made="CA"
fi

if ! server_ok; then
  new_key "$work/server.key"
  openssl req -new -config "$work/openssl.cnf" -key "$work/server.key" -subj "/CN=localhost" \
    -out "$work/server.csr"
  openssl x509 -req -in "$work/server.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
    -extfile "$work/openssl.cnf" -extensions server_ext -out "$work/server.crt" 2>/dev/null
  printf '%s\n' "$sans" >"$work/server.san"
  mv -f "$work/server.key" "$dir/server.key"
  mv -f "$work/server.crt" "$dir/server.crt"
  mv -f "$work/server.san" "$dir/server.san"
  made="${made:+$made and }server certificate"
fi

chmod 0644 "$dir/ca.crt" "$dir/server.crt" "$dir/server.san"
chmod 0600 "$dir/ca.key" "$dir/server.key"

if [ -n "$made" ]; then
  echo "make-certs.sh: made $made in $dir ($sans)"
else
  echo "make-certs.sh: certificates in $dir are current"
fi
