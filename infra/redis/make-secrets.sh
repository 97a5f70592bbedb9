#!/bin/sh
# make-secrets.sh [DIR]: the secret files docker-compose.yml mounts, made once (default DIR: ./secrets).
#
#   redis_<user>_password   a random password per Redis user of users.acl.in (render-acl.sh hashes them)
#   flower_basic_auth       Flower's `user:password`
#
# Existing files are kept, so running it again only adds what is missing. The folder is 0700 (other users of
# the host cannot reach the files); the files are 0644 because compose bind-mounts them as they are, and the
# containers read them as their own users (redis 999, app 1000), not as the host user who made them.
set -eu
dir=${1:-secrets}
mkdir -p "$dir"
chmod 0700 "$dir"
random() { od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; }
# write_once FILE CONTENT: a complete file or none (temporary name, then rename); an existing one is kept
write_once() { [ -s "$1" ] || { printf '%s' "$2" > "$1.tmp" && chmod 0644 "$1.tmp" && mv "$1.tmp" "$1"; }; }
for user in admin producer worker reader flower; do
  write_once "$dir/redis_${user}_password" "$(random)"
done
write_once "$dir/flower_basic_auth" "admin:$(random)"
echo "secrets in $dir (Flower: $(cut -d: -f1 "$dir/flower_basic_auth") and the password in $dir/flower_basic_auth)"
