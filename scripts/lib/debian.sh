# Sourced by the scripts that fetch from Debian: where this machine's apt gets Debian from.
# No mirror is written into the repository; the scripts use the one the machine is set up with.

# The Debian archive this machine's apt is configured with (deb822 .sources or one-line lists).
debian_mirror() {
    local file
    for file in /etc/apt/sources.list.d/*.sources; do
        [[ -f "$file" ]] || continue
        awk '
            /^[[:space:]]*$/ { if (uri != "" && types ~ /deb($|[[:space:]])/) { print uri; found=1; exit } uri=""; types="" }
            /^Types:/ { types=$0 }
            /^URIs:/ { for (i = 2; i <= NF; i++) if ($i ~ /\/debian\/?$/) { uri=$i } }
            END { if (!found && uri != "" && types ~ /deb($|[[:space:]])/) print uri }
        ' "$file"
    done
    for file in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [[ -f "$file" ]] || continue
        awk '$1 == "deb" { for (i = 2; i <= NF; i++) if ($i ~ /^[a-z]+:\/\// && $i ~ /\/debian\/?$/) { print $i; exit } }' "$file"
    done
}
