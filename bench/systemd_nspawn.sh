#!/usr/bin/env bash
# hmd under a real systemd: a minimal Debian 12 (systemd 252) booted in systemd-nspawn, headmaster
# installed from this working tree by running docs/daemon.md's two install blocks as they stand, and
# one PASS/FAIL line per check. Needs root, network to Debian and PyPI, and about 25 GB of disk.
#
#   sudo bench/systemd_nspawn.sh            # HM_NSPAWN_DIR=/var/tmp/hm-nspawn by default
#
# $HM_NSPAWN_DIR/base    debootstrap's Debian, made once and kept for the next run
# $HM_NSPAWN_DIR/run     this run's container: a fresh copy of base (removed at the next run)
# $HM_NSPAWN_DIR/cache   uv's and apt's downloads, kept between runs (bind-mounted where they would be)
# $HM_NSPAWN_DIR/output.txt   what this prints
#
# The container shares the host's network and is driven through nsenter into its PID 1's namespaces
# (no machined registration needed: on hosts whose PID 1 is not systemd, --register=no --keep-unit).
# For speed the checks add a drop-in (WatchdogSec=6, RestartSec=1) and set max_batch_images = 4 (so a
# kill lands between batches); nothing else differs from the documented install.
set -uo pipefail

STARTED=$(date +%s.%N)
WORK=${HM_NSPAWN_DIR:-/var/tmp/hm-nspawn}
SRC=$(cd "$(dirname "$0")/.." && pwd)
BASE=$WORK/base
ROOT=$WORK/run
CACHE=$WORK/cache
MACHINE=hm-nspawn
WATCHDOG=6
CFG=/etc/headmaster/config.toml
WS=/var/lib/headmaster/workspace
HMCTL=/opt/headmaster/.venv/bin/hmctl
FAILS=0

[ "$(id -u)" -eq 0 ] || { echo "Error: run as root (debootstrap and systemd-nspawn need it)" >&2; exit 1; }
mkdir -p "$WORK" "$CACHE/root-uv" "$CACHE/user-uv" "$CACHE/apt"
exec > >(tee "$WORK/output.txt") 2>&1

say() { printf '%s\n' "$*"; }
pass() { say "PASS  $*"; }
fail() { say "FAIL  $*"; FAILS=$((FAILS + 1)); }
info() { say "INFO  $*"; }
now() { date +%s.%N; }
secs() { python3 -c "import sys; print(f'{int(sys.argv[1]) / 1e6:.2f}')" "$1"; }  # microseconds -> seconds
at() {  # seconds from $1 (epoch) to the first journal line of hmd's unit since then that matches $2
    C journalctl -u hmd --since "@${1%.*}" -o short-unix --no-pager | python3 -c '
import sys
t0, pattern = float(sys.argv[1]), sys.argv[2]
print(next((f"{float(l.split()[0]) - t0:.1f}" for l in sys.stdin if pattern in l), "?"))' "$1" "$2"
}
since() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }

# -- the tools and the base system ------------------------------------------------------------
missing=""
command -v debootstrap >/dev/null || missing="$missing debootstrap"
command -v systemd-nspawn >/dev/null || missing="$missing systemd-container"
if [ -n "$missing" ]; then
    info "installing$missing"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing \
        >/dev/null || { echo "Error: cannot install$missing" >&2; exit 1; }
fi
if [ ! -x "$BASE/usr/lib/systemd/systemd" ]; then
    info "debootstrap bookworm into $BASE (once; a few minutes)"
    rm -rf "$BASE.part"
    debootstrap --variant=minbase --include=systemd,systemd-sysv,dbus,libpam-systemd,python3,ca-certificates,procps \
        bookworm "$BASE.part" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 \
        || { echo "Error: debootstrap failed; see $WORK/debootstrap.log" >&2; exit 1; }
    mv "$BASE.part" "$BASE"
fi
rm -rf "$ROOT"
cp -a "$BASE" "$ROOT"
# the working tree as `git clone` would leave it (tracked and untracked files, not what git ignores)
mkdir -p "$ROOT/opt/headmaster" "$ROOT/root/.cache/uv" "$ROOT/home/hmuser/.cache/uv"
(cd "$SRC" && git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
    [ -e "$f" ] && printf '%s\0' "$f"; done | tar --null -T - -cf -) | tar -C "$ROOT/opt/headmaster" -xf -

# A host whose HTTPS goes through an intercepting proxy trusts that proxy's CA in /usr/local/share/ca-certificates:
# the container trusts the same ones (as any machine on that network must), and uv (which keeps its own roots)
# is pointed at the system bundle. On an ordinary network this changes nothing.
TLS_ENV=""
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$ROOT/usr/local/share/ca-certificates/"
    TLS_ENV="SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt"
fi

# the two install blocks of docs/daemon.md, as they stand (the clone replaced by the copy above)
extract() {  # $1: which marked block (1: system-wide, 2: per user)
    awk -v want="$1" '/<!-- bench\/systemd_nspawn.sh runs this block/ {n++; next}
        n == want && /^```sh/ {on = 1; next} on && /^```/ {exit} on' "$SRC/docs/daemon.md" \
        | sed -E 's#^git clone .*#: git clone: the working tree was copied to /opt/headmaster#'
}
{ echo 'set -ex'; extract 1; } >"$ROOT/root/install-system.sh"
{ echo 'set -ex'; extract 2; } >"$ROOT/home/hmuser/install-user.sh"

# -- boot ---------------------------------------------------------------------------------------
systemd-nspawn -D "$ROOT" --boot --register=no --keep-unit --console=read-only --machine=$MACHINE \
    --bind="$CACHE/root-uv:/root/.cache/uv" --bind="$CACHE/user-uv:/home/hmuser/.cache/uv" \
    --bind="$CACHE/apt:/var/cache/apt/archives" >"$WORK/console.log" 2>&1 &
NSPAWN=$!
cleanup() {
    kill -TERM "$NSPAWN" 2>/dev/null && wait "$NSPAWN" 2>/dev/null
}
trap cleanup EXIT
PID1=""
for _ in $(seq 300); do  # the container's systemd: nspawn's child (or, while it starts, grandchild)
    for pid in $(pgrep -P "$NSPAWN") $(for c in $(pgrep -P "$NSPAWN"); do pgrep -P "$c"; done); do
        [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = systemd ] && PID1=$pid && break 2
    done
    sleep 0.1
done
[ -n "$PID1" ] || { echo "Error: the container did not boot; see $WORK/console.log" >&2; exit 1; }

C() {  # run a command inside the container, as root, with a clean environment
    nsenter -t "$PID1" -m -u -i -n -p -C -r -w -- env -i PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
        HOME=/root LANG=C.UTF-8 TERM=dumb SYSTEMD_PAGER= SYSTEMD_COLORS=0 $TLS_ENV "$@"
}
AS_HM() { C runuser -u headmaster -- "$@"; }
prop() { C systemctl show hmd -p "$1" --value; }
status_json() { AS_HM "$HMCTL" --socket /run/headmaster/hmd.sock status --json 2>/dev/null; }
restarted_from() { [ "$(prop MainPID)" != "$1" ] && C systemctl is-active -q hmd; }  # pids are the container's
exists() { compgen -G "$1" >/dev/null; }
cpid_kill() { C kill "$1" "$2"; }  # $1: the signal, $2: a pid in the container
jget() { python3 -c "import json, sys; d = json.load(sys.stdin); print(eval(sys.argv[1], {}, {'d': d}))" "$1"; }
wait_until() {  # $1 seconds, then a command that succeeds when done
    local deadline=$(( $(date +%s) + $1 )); shift
    until "$@" >/dev/null 2>&1; do [ "$(date +%s)" -ge "$deadline" ] && return 1; sleep 0.2; done
}
journal() { C journalctl -u hmd --since "@$1" -o cat --no-pager; }

state=""
for _ in $(seq 300); do  # until the container's boot is done (its manager answers only after a moment)
    state=$(C systemctl is-system-running 2>/dev/null)
    case $state in running|degraded) break ;; esac
    sleep 0.2
done
if [ -n "$TLS_ENV" ]; then
    C update-ca-certificates --fresh >"$WORK/ca.log" 2>&1 && info "the host's extra CA certificates are trusted in the container too" \
        || { cat "$WORK/ca.log"; echo "Error: update-ca-certificates failed in the container" >&2; exit 1; }
fi
info "container up ($state): $(C systemctl --version | head -1); host kernel $(uname -r); headmaster $(git -C "$SRC" describe --always --dirty) ($(date -u '+%Y-%m-%d %H:%M UTC'))"

# -- install, as docs/daemon.md says -------------------------------------------------------------
t=$(now)
if ! C bash /root/install-system.sh >"$WORK/install-system.log" 2>&1; then
    tail -30 "$WORK/install-system.log"
    fail "the system-wide install block of docs/daemon.md (log: $WORK/install-system.log)"
    exit 1
fi
info "system-wide install block ran in $(since "$t")s (log: $WORK/install-system.log)"
C systemd-analyze verify /etc/systemd/system/hmd.service >"$WORK/verify.log" 2>&1 \
    && info "systemd-analyze verify hmd.service: clean" || info "systemd-analyze verify hmd.service: $(cat "$WORK/verify.log")"
info "systemd-analyze security hmd: $(C systemd-analyze security hmd --no-pager | tail -1)"

# the bench's settings: a short watchdog, a quick restart, small batches
mkdir -p "$ROOT/etc/systemd/system/hmd.service.d"
printf '[Service]\nWatchdogSec=%s\nRestartSec=1\n' "$WATCHDOG" >"$ROOT/etc/systemd/system/hmd.service.d/bench.conf"
sed -i 's/^max_batch_images = .*/max_batch_images = 4/' "$ROOT$CFG"
C systemctl daemon-reload
C systemctl restart hmd

# -- 1. active only after READY=1 ------------------------------------------------------------------
main=$(prop MainPID)
start=$(prop ExecMainStartTimestampMonotonic); active=$(prop ActiveEnterTimestampMonotonic)
ready=$(C journalctl -u hmd _PID="$main" -o json --no-pager | python3 -c '
import json, sys
print(next((json.loads(l)["__MONOTONIC_TIMESTAMP"] for l in sys.stdin if " ready in " in json.loads(l).get("MESSAGE", "")), 0))')
if [ "$(prop Type)" = notify ] && [ "$ready" -gt "$start" ] && [ $((active - start)) -gt 100000 ] \
        && [ $((ready - active)) -lt 500000 ] && [ $((active - ready)) -lt 500000 ]; then
    pass "active only after READY=1 (Type=notify): process started at +0.00s, hmd logged READY at +$(secs $((ready - start)))s, unit active at +$(secs $((active - start)))s"
else
    fail "active only after READY=1: start $start, ready $ready, active $active (monotonic us), type $(prop Type)"
fi

# -- 2. the watchdog restarts a frozen hmd -----------------------------------------------------------
t=$(date +%s); t0=$(now); old=$(prop MainPID); restarts=$(prop NRestarts)
cpid_kill -STOP "$old"
if wait_until 60 restarted_from "$old" && journal "$t" | grep -q "Watchdog timeout"; then
    pass "watchdog restart on SIGSTOP of hmd: '$(journal "$t" | grep -m1 -o 'Watchdog timeout.*')' at +$(at "$t0" "Watchdog timeout")s, active again as pid $(prop MainPID) at +$(since "$t0")s (NRestarts $restarts -> $(prop NRestarts))"
else
    fail "watchdog restart on SIGSTOP of hmd"; journal "$t" | tail -15
fi

# -- 3. the watchdog restarts hmd whose work is stuck (its worker stopped in a request) -----------------
inbox=$WS/inbox/clothing
photo=$(ls "$ROOT$WS/unsorted" | head -1)
AS_HM cp "$WS/unsorted/$photo" "$WS/wake.jpg" && AS_HM mv "$WS/wake.jpg" "$inbox/wake.jpg"
if wait_until 120 exists "$ROOT$WS/classified/clothing/*/wake.jpg" \
        && worker=$(status_json | jget 'd["worker"]["pid"] if d["worker"]["running"] and not d["worker"]["busy"] else ""') \
        && [ -n "$worker" ]; then
    t=$(date +%s); t0=$(now); old=$(prop MainPID)
    cpid_kill -STOP "$worker"
    AS_HM cp "$WS/unsorted/$photo" "$WS/stuck.jpg" && AS_HM mv "$WS/stuck.jpg" "$inbox/stuck.jpg"
    if wait_until 90 restarted_from "$old"; then
        log=$(journal "$t")
        why=$(printf '%s\n' "$log" | grep -m1 "watchdog: not pinging systemd")
        order=$(printf '%s\n' "$log" | grep -n -m2 -e "watchdog: not pinging systemd" -e "Watchdog timeout" | cut -d: -f1 | tr '\n' ' ')
        if [ -n "$why" ] && printf '%s' "$why" | grep -q "in 'decide'.*stopped (SIGSTOP)" \
                && printf '%s\n' "$log" | grep -q "Watchdog timeout" && [ "$(echo $order | cut -d' ' -f1)" -lt "$(echo $order | cut -d' ' -f2)" ] \
                && wait_until 120 exists "$ROOT$WS/classified/clothing/*/stuck.jpg"; then
            pass "watchdog restart on a stuck work loop (worker pid $worker stopped, then a file dropped): hmd stopped pinging and said why at +$(at "$t0" "not pinging systemd")s, systemd's watchdog timeout at +$(at "$t0" "Watchdog timeout")s, active again at +$(since "$t0")s; the file was sorted after the restart"
            say "      hmd: ${why#*ERROR   }"
        else
            fail "watchdog restart on a stuck work loop: the log does not say why before the timeout, or the file was not sorted"
            printf '%s\n' "$log" | tail -15
        fi
    else
        fail "watchdog restart on a stuck work loop: no restart within 90 s"; journal "$t" | tail -15
    fi
    cpid_kill -CONT "$worker" 2>/dev/null
else
    fail "watchdog restart on a stuck work loop: the worker did not start (wake.jpg not sorted)"; journal "$(date +%s -d '-3 min')" | tail -15
fi

# -- 4. kill -9 in the middle of sorting: every inbox file exists exactly once after the restart --------
stage=/var/lib/headmaster/k9
AS_HM sh -c "mkdir -p $stage && i=0 && for f in $WS/unsorted/*.jpg; do i=\$((i+1)); cp \"\$f\" $stage/k9-\$i.jpg; printf 'k9-%03d' \$i >> $stage/k9-\$i.jpg; done"
(cd "$ROOT$stage" && sha256sum -- *.jpg | awk '{print $1}' | sort) >"$WORK/k9.sha256"
total=$(wc -l <"$WORK/k9.sha256")
old=$(prop MainPID)
AS_HM sh -c "mv $stage/*.jpg $inbox/"
sorted_k9() { find "$ROOT$WS/classified/clothing" -name 'k9-*' -type f | wc -l; }
if wait_until 120 sh -c "[ \$(find $ROOT$WS/classified/clothing -name 'k9-*' -type f | wc -l) -gt 0 ]"; then
    cpid_kill -9 "$old"; at_kill=$(sorted_k9)
    if wait_until 60 restarted_from "$old" && wait_until 180 sh -c "! ls $ROOT$inbox | grep -q '^k9-'"; then
        find "$ROOT$WS/classified/clothing" "$ROOT$inbox" -type f -exec sha256sum {} + | awk '{print $1}' | sort >"$WORK/after.sha256"
        counts=$(python3 - "$WORK/k9.sha256" "$WORK/after.sha256" <<'EOF'
import collections, sys
want = open(sys.argv[1]).read().split()
seen = collections.Counter(open(sys.argv[2]).read().split())
print(" ".join(str(seen[h]) for h in want))
EOF
)
        once=$(echo "$counts" | tr ' ' '\n' | grep -c '^1$')
        if [ "$once" -eq "$total" ]; then
            pass "restart on kill -9 (killed with $at_kill of $total files sorted): after the restart all $total exist exactly once, none lost or doubled"
        else
            fail "restart on kill -9: copies per file: $counts"
        fi
    else
        fail "restart on kill -9: no restart, or the inbox did not empty"
    fi
else
    fail "restart on kill -9: sorting never began"
fi

# -- 5. reload with a good and with a bad config ---------------------------------------------------------
C cp "$CFG" "$CFG.good"
main=$(prop MainPID); t=$(date +%s)
C sed -i 's/^settle_seconds = .*/settle_seconds = 1.5/' "$CFG"
if C systemctl reload hmd && journal "$t" | grep -q "config reloaded" && [ "$(prop MainPID)" = "$main" ]; then
    pass "reload with a good config: systemctl reload exit 0, hmd: '$(journal "$t" | grep -m1 -o 'config reloaded.*')', same pid $main"
else
    fail "reload with a good config"; journal "$t" | tail
fi
t=$(date +%s)
C sed -i 's/^\[daemon\]$/[daemon]\ndebounce = 2/' "$CFG"
C systemctl reload hmd >"$WORK/reload-bad.txt" 2>&1; rc=$?
err=$(journal "$t" | grep -m1 "^Error: reload failed")
shown=$(AS_HM "$HMCTL" --socket /run/headmaster/hmd.sock status 2>&1 | grep -m1 "PROBLEM: the last reload failed")
if [ "$rc" -ne 0 ] && [ -n "$err" ] && C systemctl is-active -q hmd && [ "$(prop MainPID)" = "$main" ] && [ -n "$shown" ]; then
    pass "reload with a bad config: systemctl reload exit $rc ('$(head -1 "$WORK/reload-bad.txt")'), journal: '${err:0:120}...', hmd still active on the old config (pid $main), hmctl status: '${shown:0:60}...'"
else
    fail "reload with a bad config: systemctl reload exit $rc, journal: '$err', status: '$shown'"
fi
C cp "$CFG.good" "$CFG" && C systemctl reload hmd || fail "reload back to the good config"

# -- 6. a clean stop ---------------------------------------------------------------------------------------
t0=$(now)
C systemctl stop hmd; took=$(since "$t0")
left=$(C sh -c "pgrep -u headmaster | wc -l")
if [ "$(prop Result)" = success ] && [ "$(prop ExecMainStatus)" = 0 ] && [ "$left" -eq 0 ] \
        && [ ! -e "$ROOT/run/headmaster/hmd.sock" ]; then
    pass "clean stop: systemctl stop took ${took}s, exit status 0, no process of the service left, socket gone"
else
    fail "clean stop: result $(prop Result), status $(prop ExecMainStatus), $left process(es) left"
fi

# -- 7. the user unit's sandbox: / read-only, the home writable ----------------------------------------------
C useradd --create-home --shell /bin/bash hmuser 2>/dev/null
C chown -R hmuser:hmuser /home/hmuser
uid=$(C id -u hmuser)
C loginctl enable-linger hmuser
wait_until 30 test -S "$ROOT/run/user/$uid/systemd/private"
AS_USER() { C runuser -u hmuser -- env HOME=/home/hmuser USER=hmuser XDG_RUNTIME_DIR=/run/user/"$uid" \
    PATH=/home/hmuser/.local/bin:/usr/local/bin:/usr/bin:/bin "$@"; }
t=$(now)
if ! AS_USER bash /home/hmuser/install-user.sh >"$WORK/install-user.log" 2>&1; then
    tail -30 "$WORK/install-user.log"; fail "the per-user install block of docs/daemon.md (log: $WORK/install-user.log)"
else
    info "per-user install block ran in $(since "$t")s (log: $WORK/install-user.log)"
    upid=$(AS_USER systemctl --user show hmd -p MainPID --value)
    root_opts=$(C cat /proc/"$upid"/mountinfo | awk '$5 == "/" {o = $6} END {print o}')
    home_opts=$(C cat /proc/"$upid"/mountinfo | awk '$5 == "/home/hmuser" {o = $6} END {print o}')
    write_root=$(C nsenter -t "$upid" -m -- sh -c 'touch /hm-probe 2>&1 && rm /hm-probe && echo written')
    write_home=$(C nsenter -t "$upid" -m -- sh -c 'touch /home/hmuser/hm-probe 2>&1 && rm /home/hmuser/hm-probe && echo written')
    uphoto=$(ls "$ROOT/home/hmuser/headmaster/unsorted" | head -1)
    AS_USER cp "/home/hmuser/headmaster/unsorted/$uphoto" /home/hmuser/u.jpg
    AS_USER mv /home/hmuser/u.jpg /home/hmuser/headmaster/inbox/clothing/u.jpg
    ctl=$(AS_USER hmctl --config /home/hmuser/.config/headmaster/config.toml status 2>&1 | head -1)
    if [ "${root_opts%%,*}" = ro ] && [ "${home_opts%%,*}" = rw ] && [ "$write_home" = written ] \
            && [ "$write_root" != written ] && wait_until 120 exists "$ROOT/home/hmuser/headmaster/classified/clothing/*/u.jpg" \
            && [ "${ctl#hmd pid}" != "$ctl" ]; then
        pass "the user unit's sandbox (PrivateUsers=yes): / is $root_opts ('${write_root}'), ~ is $home_opts; a file was sorted and hmctl answers ('${ctl:0:40}...')"
    else
        fail "the user unit's sandbox: / $root_opts ($write_root), home $home_opts ($write_home), hmctl: $ctl"
    fi
    C sh -c "cd /opt/headmaster && runuser -u hmuser -- env XDG_RUNTIME_DIR=/run/user/$uid systemd-analyze --user verify /home/hmuser/.config/systemd/user/hmd.service" \
        >"$WORK/verify-user.log" 2>&1 && info "systemd-analyze --user verify hmd.service: clean" \
        || info "systemd-analyze --user verify hmd.service: $(cat "$WORK/verify-user.log")"
    # for contrast, the unit as it was before PrivateUsers=yes
    if (cd "$SRC" && git show main:systemd/hmd-user.service) >"$WORK/hmd-user.before.service" 2>/dev/null \
            && ! grep -q '^PrivateUsers=yes' "$WORK/hmd-user.before.service"; then
        cp "$WORK/hmd-user.before.service" "$ROOT/home/hmuser/.config/systemd/user/hmd.service"
        AS_USER systemctl --user daemon-reload && AS_USER systemctl --user restart hmd
        upid=$(AS_USER systemctl --user show hmd -p MainPID --value)
        before=$(C nsenter -t "$upid" -m -- sh -c 'touch /hm-probe 2>&1 && rm /hm-probe && echo written')
        info "the user unit from main (no PrivateUsers=): / is $(C cat /proc/"$upid"/mountinfo | awk '$5 == "/" {o = $6} END {print o}') for hmd ('$before')"
        AS_USER systemctl --user stop hmd
    fi
fi

say "$([ "$FAILS" -eq 0 ] && echo "all checks passed" || echo "$FAILS check(s) failed") in $(since "$STARTED")s (output: $WORK/output.txt)"
exit $((FAILS > 0))
