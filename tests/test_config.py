from __future__ import annotations

from pathlib import Path

import pytest

from nodewatch.config import ConfigError, format_duration, load_config, parse_duration


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "nodewatch.toml"
    path.write_text(text)
    return path


def test_defaults_need_no_file() -> None:
    cfg = load_config()
    assert cfg.detection.healthy_interval == 30.0
    assert cfg.detection.unhealthy_interval == 5.0
    assert cfg.detection.fall == 3 and cfg.detection.rise == 2
    assert cfg.guard.fraction == 0.5 and cfg.guard.min_nodes == 4
    assert cfg.agent.sample_interval == 5.0


@pytest.mark.parametrize(
    ("text", "seconds"), [("250ms", 0.25), ("5s", 5.0), ("1m", 60.0), ("1h", 3600.0), ("0", 0.0)]
)
def test_durations_parse(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_duration_round_trips_through_format() -> None:
    for seconds in (0.25, 5.0, 60.0, 3600.0, 90.0):
        assert parse_duration(format_duration(seconds)) == seconds


def test_file_values_and_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, '[detection]\nfall = 5\nhealthy_interval = "10s"\n')
    cfg = load_config(path, {"detection.rise": 4})
    assert (cfg.detection.fall, cfg.detection.rise, cfg.detection.healthy_interval) == (5, 4, 10.0)


@pytest.mark.parametrize(
    ("text", "key", "expected"),
    [
        ("[detection]\nfall = 0\n", "detection.fall", ">= 1"),
        ('[detection]\nfall = "3"\n', "detection.fall", "int"),
        ('[detection]\ntimeout = "-1s"\n', "detection.timeout", "duration"),
        ('[detection]\ntimeout = 5\n', "detection.timeout", "duration"),
        ("[detection]\nfalls = 3\n", "detection.falls", "unknown key"),
        ("[nonsense]\n", "nonsense", "unknown key"),
        ('[agent]\nsample_interval = "30s"\n', "agent.sample_interval", "between 1s and 15s"),
        ('[[agent.rules]]\nmetric = "cpu_percent"\n', "agent.rules[0]", "above"),
        ('[[actions]]\ntype = "webhook"\n', "actions[0].url", "required"),
        ('[[actions]]\ntype = "pager"\nurl = "x"\n', "actions[0].type", "webhook"),
        ('[guard]\nfraction = 1.5\n', "guard.fraction", "<= 1"),
        ('[coordinator]\npoller_processes = -1\n', "coordinator.poller_processes", ">= 0"),
        ('[detection]\ndown_interval = "-4s"\n', "detection.down_interval", "duration"),
        ('[[actions]]\ntype = "exec"\ncommand = ["true"]\non = ["unhealty"]\n',
         "actions[0].on", "unknown event 'unhealty'"),
        ('[detection]\nsuspicion = "accrual"\n', "detection.suspicion", "fixed, phi"),
        ("[detection]\nphi_threshold = 0\n", "detection.phi_threshold", "> 0"),
        ("[detection]\nphi_window = 1\n", "detection.phi_window", ">= 2"),
        ("[detection]\nphi_window = 20\nphi_min_samples = 30\n", "detection.phi_min_samples",
         "at most detection.phi_window"),
        ('[detection]\nphi_min_std = "0s"\n', "detection.phi_min_std", "greater than 0"),
        ("[detection]\nphi_pause = 3\n", "detection.phi_pause", "duration"),
        ('[[actions]]\ntype = "haproxy"\nsocket = "/run/h.sock"\nbackend = "be"\n'
         'observe_interval = "0s"\n', "actions[0].observe_interval", "greater than 0"),
        ('[[actions]]\ntype = "haproxy"\nsocket = "/run/h.sock"\nbackend = "be"\n'
         'observe_interval = "6s"\n', "actions[0].observe_interval",
         "at most outliers.window (5s)"),
        ('[[actions]]\ntype = "haproxy"\nsocket = "/run/h.sock"\nbackend = "be"\n'
         'observe = "yes"\n', "actions[0].observe", "bool"),
        ('[agent]\nlabels = "zone=a"\n', "agent.labels", "object"),
        ("[agent]\nlabels = {zone = 3}\n", "agent.labels[...]", "str"),
        ('[agent]\nlabels = {"zone=a" = "b"}\n', "agent.labels['zone=a']", "without '='"),
        ('[agent]\nlabels = {"" = "b"}\n', "agent.labels['']", "1-256 characters"),
        ('[agent]\nlabels = {"my zone" = "b"}\n', "agent.labels['my zone']", "spaces"),
        (f'[agent]\nlabels = {{zone = "{"x" * 257}"}}\n', "agent.labels['zone']",
         "at most 256 characters"),
        ("[agent]\nlabels = {" + ", ".join(f'k{i} = "v"' for i in range(65)) + "}\n",
         "agent.labels", "at most 64 labels, got 65"),
        ('[coordinator]\ncoordination = "raft"\n', "coordinator.coordination",
         "election, shares"),
        ('[coordinator]\ncoordination = "shares"\nlisten = "0.0.0.0:7300"\n'
         'store = "etcd://10.0.0.1:2379/nw"\n',
         "coordinator.advertise_url", "listen is a wildcard address"),
        ('[coordinator]\ncoordination = "shares"\n', "coordinator.coordination",
         "needs an etcd:// store"),
        ('[coordinator]\nadvertise_url = "10.0.0.1:7300"\n', "coordinator.advertise_url",
         "http:// or https:// URL"),
        ('[agent]\ncoordinator = ["http://a:7300", "b:7300"]\n', "agent.coordinator",
         "'b:7300'"),
        ('[agent]\ncoordinator = 7300\n', "agent.coordinator", "str"),
        ('[coordinator]\nrefresh_interval = "500ms"\n', "coordinator.refresh_interval",
         "between 1s and 1h"),
        ('[coordinator]\nrefresh_interval = "2h"\n', "coordinator.refresh_interval",
         "between 1s and 1h"),
        ('[detection]\nhistory_rollup = "5s"\n', "detection.history_rollup",
         "between 10s and 1d"),
        ('[detection]\netcd_history_rollup = "2d"\n', "detection.etcd_history_rollup",
         "between 10s and 1d"),
        ('[detection]\nhistory_full_resolution = "-1m"\n', "detection.history_full_resolution",
         "duration"),
    ],
)
def test_bad_values_name_file_key_and_expectation(
    tmp_path: Path, text: str, key: str, expected: str
) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: {key}:"), message
    assert expected in message


def test_agent_labels_from_the_file_and_in_code(tmp_path: Path) -> None:
    from nodewatch.config import AgentConfig, check_agent_config

    assert load_config().agent.labels == {}
    path = write(tmp_path, '[agent]\nnode_id = "web-1"\n'
                           'labels = {zone = "a", "topology.kubernetes.io/zone" = "eu-1b"}\n')
    agent = load_config(path).agent
    assert agent.labels == {"zone": "a", "topology.kubernetes.io/zone": "eu-1b"}
    check_agent_config(agent)
    # Built in code (Agent(config=...)), the same rules apply.
    with pytest.raises(ConfigError, match=r"agent.labels\['a=b'\]: expected a key"):
        check_agent_config(AgentConfig(node_id="web-1", labels={"a=b": "c"}))


def test_phi_suspicion_keys_reach_the_policy(tmp_path: Path) -> None:
    from nodewatch.detect.policy import Policy

    assert load_config().detection.suspicion == "fixed"  # the fixed deadline stays the default
    path = write(tmp_path, '[detection]\nsuspicion = "phi"\nphi_threshold = 10\n'
                           'phi_window = 200\nphi_min_samples = 20\nphi_min_std = "250ms"\n'
                           'phi_pause = "1s"\n')
    policy = Policy.from_config(load_config(path))
    assert (policy.suspicion, policy.phi_threshold, policy.phi_window, policy.phi_min_samples,
            policy.phi_min_std, policy.phi_pause) == ("phi", 10.0, 200, 20, 0.25, 1.0)


def test_invalid_toml_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[detection\n"))
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")
