#!/bin/sh
# render-acl.sh OUT: write the ACL file of users.acl.in (next to this script) to OUT, for `redis-server --aclfile`.
#
# Each user's password is read from a file, never from an argument or the environment of redis-server:
# $REDIS_SECRETS_DIR/redis_<user>_password (default folder /run/secrets, where compose and Kubernetes mount
# secrets). Only its SHA-256 hash is written. The namespace is $BATCHINFER_NAMESPACE (default batchinfer).
set -eu
out=${1:?usage: render-acl.sh OUT}
here=$(dirname "$0")
secrets=${REDIS_SECRETS_DIR:-/run/secrets}
ns=${BATCHINFER_NAMESPACE:-batchinfer}
case "$ns" in
  *[!A-Za-z0-9_.-]* | "" | [!A-Za-z0-9]*) echo "render-acl.sh: bad BATCHINFER_NAMESPACE: $ns" >&2; exit 2 ;;
esac
script="s/@NS@/$ns/g"
for user in admin producer worker reader flower; do
  file="$secrets/redis_${user}_password"
  if [ ! -s "$file" ]; then
    echo "render-acl.sh: missing or empty $file (the $user user's password)" >&2
    exit 2
  fi
  # the file's content without its trailing newlines (as BATCHINFER_REDIS_PASSWORD_FILE is read), hashed as
  # Redis hashes `>password`
  hash=$(printf '%s' "$(cat "$file")" | sha256sum | cut -d' ' -f1)
  upper=$(echo "$user" | tr '[:lower:]' '[:upper:]')
  script="$script;s/@$upper@/$hash/"
done
umask 077
grep -v '^#' "$here/users.acl.in" | grep -v '^$' | sed "$script" > "$out.tmp"
mv "$out.tmp" "$out"
