#!/usr/bin/env bash
# One entry point for the set-up contract: `scripts/dev.sh demo` and `scripts/dev.sh test`.
# Installs what it needs (Debian servers, a virtualenv, the package) and is safe to re-run.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

need_debs() {
  local missing=()
  command -v etcd >/dev/null || missing+=(etcd-server)
  command -v etcdctl >/dev/null || missing+=(etcd-client)
  command -v redis-server >/dev/null || missing+=(redis-server)
  command -v haproxy >/dev/null || [[ -x /usr/sbin/haproxy ]] || missing+=(haproxy)
  command -v nginx >/dev/null || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
  command -v wrk >/dev/null || missing+=(wrk)
  command -v socat >/dev/null || missing+=(socat)
  # A real Prometheus discovers and scrapes agents through nodewatch (tests/e2e/test_prometheus.py);
  # systemd-analyze checks the units in deploy/ (tests/test_deploy.py).
  command -v prometheus >/dev/null || missing+=(prometheus)
  command -v systemd-analyze >/dev/null || missing+=(systemd)
  # The fault suite (tests/faults/): namespaces and veth, nftables drops, skewed clocks.
  command -v ip >/dev/null || [[ -x /usr/sbin/ip ]] || missing+=(iproute2)
  command -v nft >/dev/null || [[ -x /usr/sbin/nft ]] || missing+=(nftables)
  command -v faketime >/dev/null || missing+=(faketime)
  command -v taskset >/dev/null || missing+=(util-linux)
  # Headless browser for the dashboard test (tests/api/test_dashboard.py).
  command -v chromium >/dev/null || missing+=(chromium)
  command -v chromedriver >/dev/null || missing+=(chromium-driver)
  if ((${#missing[@]})); then
    if [[ $(id -u) -ne 0 ]]; then
      echo "missing Debian packages: ${missing[*]} (run as root to install them)" >&2
      return 0
    fi
    # Keep the packaged services from starting on their default ports during install (the
    # tests start their own on free loopback ports); the block is lifted again afterwards.
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      made_policy=1
    fi
    echo "installing Debian packages: ${missing[*]}" >&2
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}" >/dev/null
    if ((made_policy)); then rm -f /usr/sbin/policy-rc.d; fi
  fi
}

need_venv() {
  if [[ ! -x $VENV/bin/python ]]; then
    "$PY" -m venv "$VENV"
  fi
  local stamp=$VENV/.installed
  if [[ ! -f $stamp || pyproject.toml -nt $stamp ]]; then
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e '.[dev]'
    touch "$stamp"
  fi
}

# The package as users get it: `python -m build` (sdist, then the wheel from the sdist), the
# wheel checked for its package data, installed into a fresh virtualenv in a temporary
# directory, and run from outside the source tree: --version, completion, an 8 s demo whose
# dashboard is fetched while it runs.
check_package() {
  local started=$SECONDS tmp
  tmp=$(mktemp -d /tmp/nodewatch-package.XXXXXX)
  # shellcheck disable=SC2064
  trap "rm -rf '$tmp'" RETURN
  if ! "$VENV/bin/python" -m build --outdir "$tmp/dist" . >"$tmp/build.log" 2>&1; then
    cat "$tmp/build.log" >&2; echo "package: python -m build failed" >&2; return 1
  fi
  local wheel sdist
  wheel=$(echo "$tmp"/dist/nodewatch-*.whl)
  sdist=$(echo "$tmp"/dist/nodewatch-*.tar.gz)
  [[ -f $wheel && -f $sdist ]] || { echo "package: no wheel or sdist built" >&2; return 1; }
  "$VENV/bin/python" - "$wheel" <<'PY' || return 1
import sys, zipfile
names = set(zipfile.ZipFile(sys.argv[1]).namelist())
need = ["nodewatch/py.typed", "nodewatch/api/static/index.html",
        "nodewatch/api/static/dashboard.js", "nodewatch/api/static/dashboard.css"]
need += [n for n in names if n.endswith("nodewatch-coordinator.service")] or ["(the units)"]
missing = [n for n in need if n not in names]
if missing:
    sys.exit(f"package: the wheel lacks {missing}")
PY
  "$PY" -m venv "$tmp/venv"
  if ! "$tmp/venv/bin/python" -m pip install -q --disable-pip-version-check "$wheel" \
      >"$tmp/pip.log" 2>&1; then
    cat "$tmp/pip.log" >&2; echo "package: the wheel does not install" >&2; return 1
  fi
  local port
  port=$("$tmp/venv/bin/python" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  # `set -e` does not apply left of `||`: every step below says how it fails.
  (
    cd "$tmp" || exit 1
    bin=$tmp/venv/bin
    "$bin/python" -c 'import nodewatch, sys; sys.exit(0 if nodewatch.__file__.startswith(sys.prefix) else f"nodewatch imported from {nodewatch.__file__}")' || exit 1
    "$bin/nodewatch" --version || exit 1
    "$bin/nodewatch" completion bash | grep -q _NODEWATCH_COMPLETE || exit 1
    "$bin/nodewatch" completion zsh | grep -q '#compdef nodewatch' || exit 1
    [[ -f $tmp/venv/share/nodewatch/nodewatch-agent.service ]] || { echo "no units in share/" >&2; exit 1; }
    "$bin/nodewatch" demo --nodes 2 --duration 8s --dir "$tmp/demo" --listen "127.0.0.1:$port" \
      </dev/null >"$tmp/demo.log" 2>&1 &
    demo=$!
    "$bin/python" - "$port" <<'PY' || { kill "$demo"; cat "$tmp/demo.log" >&2; exit 1; }
import sys, time, urllib.request
base = f"http://127.0.0.1:{sys.argv[1]}"
deadline = time.monotonic() + 8
while True:
    try:
        for path in ("/", "/static/dashboard.js", "/v1/nodes"):
            with urllib.request.urlopen(base + path, timeout=1) as resp:
                assert resp.status == 200, (path, resp.status)
        break
    except OSError:
        if time.monotonic() > deadline:
            sys.exit("package: the demo's dashboard did not answer within 8s")
        time.sleep(0.1)
PY
    wait "$demo" || { echo "the demo exited with $?" >&2; cat "$tmp/demo.log" >&2; exit 1; }
    grep -q "dashboard" "$tmp/demo.log" || { cat "$tmp/demo.log" >&2; exit 1; }
  ) || { echo "package: the installed wheel did not run" >&2; return 1; }
  echo "package: $(basename "$wheel") and $(basename "$sdist") built, installed in a fresh" \
       "virtualenv and run outside the source tree in $((SECONDS - started))s"
}

cmd=${1:-test}; shift || true
case "$cmd" in
  demo)
    need_venv
    exec "$VENV/bin/nodewatch" demo "$@"
    ;;
  test)
    need_debs
    need_venv
    "$VENV/bin/ruff" check src tests bench
    "$VENV/bin/mypy" --no-error-summary
    set +e
    # Without arguments: the main suite (every test but tests/e2e and the fault suite), then
    # the end-to-end suite (tests/e2e: clusters of real processes, dashboards in Chromium,
    # Prometheus, HAProxy), the package, then the fault suite. Arguments choose what to run.
    if [[ $# -eq 0 ]]; then
      "$VENV/bin/python" -m pytest -q -p no:cacheprovider --ignore=tests/e2e
    else
      "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
    fi
    rc=$?
    # pytest's 5 means no test ran: that is a failure, not a pass.
    [[ $rc -eq 5 ]] && { echo "no tests ran" >&2; exit 1; }
    # Then the fault suite (real faults in network namespaces; root only, ~7 min on 2 cores),
    # unless arguments chose what to run. Its figures go to NODEWATCH_FAULT_RESULTS and
    # scripts/fault_table.py prints them as the README's table.
    frc=0
    if [[ $# -eq 0 ]]; then
      "$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/e2e
      erc=$?
      [[ $erc -eq 5 ]] && { echo "no end-to-end test ran" >&2; erc=1; }
      ((erc == 0)) || rc=$erc
      check_package || rc=1
      "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m faults tests/faults
      frc=$?
      [[ $frc -eq 5 ]] && { echo "no fault test ran" >&2; frc=1; }
      if [[ -n ${NODEWATCH_FAULT_RESULTS:-} && -f $NODEWATCH_FAULT_RESULTS ]]; then
        "$VENV/bin/python" scripts/fault_table.py "$NODEWATCH_FAULT_RESULTS"
      fi
    fi
    set -e
    ((rc == 0)) || exit $rc
    exit $frc
    ;;
  package)
    need_venv
    check_package
    ;;
  lint)
    need_venv
    "$VENV/bin/ruff" check src tests bench && "$VENV/bin/mypy"
    ;;
  *)
    echo "usage: scripts/dev.sh demo|test|package|lint [args]" >&2; exit 2 ;;
esac
