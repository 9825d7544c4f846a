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
    "$VENV/bin/python" -m pytest -q -p no:cacheprovider "$@"
    rc=$?
    # pytest's 5 means no test ran: that is a failure, not a pass.
    [[ $rc -eq 5 ]] && { echo "no tests ran" >&2; exit 1; }
    # Then the fault suite (real faults in network namespaces; root only, ~7 min on 2 cores),
    # unless arguments chose what to run. Its figures go to NODEWATCH_FAULT_RESULTS and
    # scripts/fault_table.py prints them as the README's table.
    frc=0
    if [[ $# -eq 0 ]]; then
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
  lint)
    need_venv
    "$VENV/bin/ruff" check src tests bench && "$VENV/bin/mypy"
    ;;
  *)
    echo "usage: scripts/dev.sh demo|test|lint [args]" >&2; exit 2 ;;
esac
