# Sourced by hack/*.sh: an apt state of our own under "$1" (sources, lists, archives), so `apt-get update`,
# `download` and `source --download-only` reach Debian bookworm without touching the system's sources or lists.
# Sets APT_OPTS for `apt-get "${APT_OPTS[@]}" …`. Pass "deb deb-src" as $2 when source packages are needed.
private_apt() {
  local root="$1" types="${2:-deb}"
  mkdir -p "$root"/{lists/partial,sources.list.d,archives/partial}
  cat > "$root/sources.list.d/bookworm.sources" <<SRC
Types: $types
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: $types
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
  APT_OPTS=(-o "Dir::Etc::SourceList=/dev/null" -o "Dir::Etc::SourceParts=$root/sources.list.d"
            -o "Dir::State::Lists=$root/lists" -o "Dir::Cache::Archives=$root/archives"
            -o "Debug::NoLocking=1" -q)
  apt-get "${APT_OPTS[@]}" update >/dev/null
}
