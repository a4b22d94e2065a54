#!/bin/sh
# Unpack onnxruntime's C/C++ API headers (Debian's libonnxruntime-dev, from trixie) into
# native/include/, where `pip install` looks for them to build the native sampler library.
#
#   sh native/fetch-ort-headers.sh            # idempotent: returns at once when the headers are there
#   STN_ORT_INCLUDE=/some/dir sh native/...   # unpack elsewhere (the build reads the same variable)
#   DEBIAN_MIRROR=http://mirror/debian sh ... # another Debian mirror (default deb.debian.org)
#
# Bookworm cannot install the trixie package, but its headers work with the onnxruntime wheel
# (API 21/23 headers with onnxruntime 1.31; the library checks the runtime's API version).
# It uses a private apt state (a trixie source list in a temporary folder), so the system's
# apt configuration is left as it is. Needs apt-get and dpkg-deb (Debian), network access to
# Debian's archive, and the archive keys of the system (bookworm's keyring signs trixie too).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
dest=${STN_ORT_INCLUDE:-$here/include}
if [ -f "$dest/onnxruntime_c_api.h" ] && [ -f "$dest/onnxruntime_cxx_api.h" ]; then
    echo "onnxruntime headers: $dest (already there)"
    exit 0
fi
suite=${STN_ORT_SUITE:-trixie}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/lists/partial" "$tmp/cache/archives/partial" "$tmp/etc/preferences.d" "$tmp/deb"
echo "deb ${DEBIAN_MIRROR:-http://deb.debian.org/debian} $suite main" > "$tmp/etc/sources.list"
opts="-o Dir::Etc::SourceList=$tmp/etc/sources.list -o Dir::Etc::SourceParts=- \
 -o Dir::Etc::PreferencesParts=$tmp/etc/preferences.d -o Dir::State::Lists=$tmp/lists \
 -o Dir::Cache=$tmp/cache -o APT::Get::List-Cleanup=0 -o Debug::NoLocking=1 -o APT::Sandbox::User=root -qq"
# shellcheck disable=SC2086
apt-get $opts update
# shellcheck disable=SC2086
(cd "$tmp/deb" && apt-get $opts download libonnxruntime-dev)
dpkg-deb -x "$tmp"/deb/libonnxruntime-dev_*.deb "$tmp/x"
src=$(dirname "$(find "$tmp/x" -name onnxruntime_c_api.h | head -1)")
if [ ! -f "$src/onnxruntime_c_api.h" ]; then
    echo "fetch-ort-headers: libonnxruntime-dev has no onnxruntime_c_api.h" >&2
    exit 1
fi
mkdir -p "$dest"
cp -r "$src"/. "$dest"/
echo "onnxruntime headers: $dest (from $(basename "$tmp"/deb/libonnxruntime-dev_*.deb))"
