#!/usr/bin/env bash
# Builds vmq's Debian package: the release binary, the man pages and shell completions it
# generates of itself (into target/package), then `cargo deb` with the metadata in
# crates/vmq/Cargo.toml. Needs cargo-deb (`cargo install cargo-deb --locked`). Prints the .deb's
# path. Run from anywhere inside the repository.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "package.sh: cargo-deb is missing: cargo install cargo-deb --locked" >&2
    exit 1
fi
for f in contrib/vmq.service contrib/vmq.toml LICENSE; do
    [ -f "$f" ] || { echo "package.sh: $f is missing" >&2; exit 1; }
done

cargo build --release -p vmq
vmq=target/release/vmq
"$vmq" check-config contrib/vmq.toml >/dev/null

out=target/package
rm -rf "$out"
mkdir -p "$out/completions"
"$vmq" man "$out/man"
"$vmq" completions bash >"$out/completions/vmq.bash"
"$vmq" completions zsh >"$out/completions/_vmq"
"$vmq" completions fish >"$out/completions/vmq.fish"

# cargo-deb prints the .deb's path. --strip: the release profile keeps line tables for
# profiling; the package ships a stripped binary.
cargo deb -p vmq --no-build --strip --output target/debian/ "$@"
