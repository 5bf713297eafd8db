# The machine's own Debian archive, read from its apt sources (sourced by
# the scripts that download Debian packages; never a hard-coded mirror, so
# everything works behind a local one).
#
#   debian_archive [SUITE]   prints the URI of the first enabled "deb"
#                            source serving SUITE (default: the host's
#                            codename) with component main, or fails with a
#                            message naming the files it read.
#   debian_keyring URI       prints the Signed-By keyring of that source,
#                            or Debian's archive keyring.

apt_source_files() {
    local f
    [ -f /etc/apt/sources.list ] && echo /etc/apt/sources.list
    for f in /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] && echo "$f"
    done
    return 0
}

host_codename() {
    (. /etc/os-release && echo "${VERSION_CODENAME:-bookworm}")
}

# Lines "URI<TAB>SUITES<TAB>COMPONENTS<TAB>KEYRING" for every enabled deb source.
apt_source_entries() {
    local f
    for f in $(apt_source_files); do
        case "$f" in
        *.sources)
            awk '
                function flush() {
                    if (types ~ /(^| )deb( |$)/ && enabled != "no")
                        n = split(uris, u, " ")
                        for (i = 1; i <= n && types ~ /(^| )deb( |$)/ && enabled != "no"; i++)
                            printf "%s\t%s\t%s\t%s\n", u[i], suites, comps, key
                    types = uris = suites = comps = key = ""; enabled = "yes"
                }
                BEGIN { enabled = "yes" }
                /^#/ { next }
                /^[ \t]*$/ { flush(); next }
                /^[ \t]/ { next }  # continuation of a multi-line field
                {
                    field = tolower($1); sub(/:$/, "", field)
                    value = $0; sub(/^[^:]*:[ \t]*/, "", value)
                    if (field == "types") types = value
                    else if (field == "uris") uris = value
                    else if (field == "suites") suites = value
                    else if (field == "components") comps = value
                    else if (field == "signed-by" && value !~ /^-/) key = value
                    else if (field == "enabled") enabled = tolower(value)
                }
                END { flush() }' "$f"
            ;;
        *)
            awk '
                /^[ \t]*deb[ \t]/ {
                    key = ""; i = 2
                    if ($2 ~ /^\[/) {
                        while (i <= NF) {
                            if ($i ~ /signed-by=/) { key = $i; sub(/.*signed-by=/, "", key); sub(/\]$/, "", key) }
                            if ($i ~ /\]$/) { i++; break }
                            i++
                        }
                    }
                    uri = $i; suite = $(i + 1); comps = ""
                    for (j = i + 2; j <= NF; j++) comps = comps (comps == "" ? "" : " ") $j
                    printf "%s\t%s\t%s\t%s\n", uri, suite, comps, key
                }' "$f"
            ;;
        esac
    done
}

debian_archive() {
    local suite=${1:-$(host_codename)} uri
    uri=$(apt_source_entries | awk -F'\t' -v s="$suite" '
        { ns = split($2, su, " "); nc = split($3, co, " "); hs = hc = 0
          for (i = 1; i <= ns; i++) if (su[i] == s) hs = 1
          for (i = 1; i <= nc; i++) if (co[i] == "main") hc = 1
          if (hs && hc) { print $1; exit } }')
    if [ -z "$uri" ]; then
        echo "no apt source serves the Debian suite '$suite' with component main (read: $(apt_source_files | tr '\n' ' '))." >&2
        echo "Add the Debian archive or a local mirror of it to /etc/apt/sources.list.d/ and run this again." >&2
        return 1
    fi
    echo "${uri%/}"
}

debian_keyring() {
    local key
    key=$(apt_source_entries | awk -F'\t' -v u="$1" '{ uri = $1; sub(/\/$/, "", uri) } uri == u && $4 != "" { print $4; exit }')
    echo "${key:-/usr/share/keyrings/debian-archive-keyring.gpg}"
}
