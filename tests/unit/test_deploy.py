"""Unit tests of what operators run: config/deploy/*.yaml, the alert rules, the
runbook's commands and the CLI's help and `config show`.

Every manifest is parsed; every container command line must parse with the
CLI's own parser, every environment variable must be a real setting, and every
probe must ask a path worker.health serves on the port it listens on.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from worker import committer
from worker.cli import build_parser, main
from worker.health import HEALTHZ_PATH, READYZ_PATH
from worker.metrics import Metrics
from worker.settings import KafkaSettings, MetricsSettings, TrackSettings
from worker.settings_doc import settings_rows
from worker.track import ThrottledError

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "config" / "deploy"
OPERATIONS_DOC = ROOT / "docs" / "operations.md"
DOCKERFILE = ROOT / "Dockerfile"
API_VERSIONS = {
    "Deployment": "apps/v1",
    "PodDisruptionBudget": "policy/v1",
    "Job": "batch/v1",
    "CronJob": "batch/v1",
    "ScaledObject": "keda.sh/v1alpha1",
    "ScaledJob": "keda.sh/v1alpha1",
    "TriggerAuthentication": "keda.sh/v1alpha1",
}
SECRET_VARIABLES = {
    "CIO_SITE_ID",
    "CIO_API_KEY",
    "CIO_KAFKA__PROPERTIES",
    "CIO_SCHEMAS__REGISTRY_PASSWORD",
    "CIO_ARCHIVE__ACCESS_KEY_ID",
    "CIO_ARCHIVE__SECRET_ACCESS_KEY",
}
SETTING_VARIABLES = {env for _, env, _, _ in settings_rows()}


def manifests() -> list[tuple[str, dict[str, Any]]]:
    """(file name, document) for every Kubernetes object under config/deploy."""
    found = []
    for path in sorted(DEPLOY.glob("*.yaml")):
        for document in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            if document and "kind" in document:
                found.append((path.name, document))
    return found


def of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in manifests() if doc["kind"] == kind]


def pod_spec(document: dict[str, Any]) -> dict[str, Any]:
    """The pod template's spec of a Deployment, Job, CronJob or ScaledJob."""
    spec = document["spec"]
    if document["kind"] == "ScaledJob":
        spec = spec["jobTargetRef"]
    elif document["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def workloads() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, document in manifests():
        if document["kind"] in ("Deployment", "Job", "CronJob", "ScaledJob"):
            yield f"{name}:{document['metadata']['name']}", document


def environment(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def literal(container: dict[str, Any], name: str, default: Any) -> Any:
    item = environment(container).get(name)
    return item["value"] if item and "value" in item else default


WORKLOADS = dict(workloads())


# -- the manifests --------------------------------------------------------------


def test_deploy_folder_has_every_example_the_runbook_names() -> None:
    """Deployment, PDB, KEDA ScaledObject and ScaledJob, replay Job, alerts."""
    kinds = {doc["kind"] for _, doc in manifests()}

    assert {"Deployment", "PodDisruptionBudget", "ScaledObject", "ScaledJob"} <= kinds
    assert "Job" in kinds
    assert (DEPLOY / "alerts.yaml").exists()


@pytest.mark.parametrize(("name", "document"), manifests())
def test_deploy_manifest_kind_has_its_api_version(
    name: str, document: dict[str, Any]
) -> None:
    """Each object is of a known kind with that kind's apiVersion and a name."""
    assert document["kind"] in API_VERSIONS, name
    assert document["apiVersion"] == API_VERSIONS[document["kind"]], name
    assert document["metadata"]["name"]


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_deploy_container_command_lines_parse_with_the_cli(workload: str) -> None:
    """Each container runs the image's cio-worker entry point with arguments the
    CLI parser accepts."""
    for container in pod_spec(WORKLOADS[workload])["containers"]:
        assert container.get("command", ["cio-worker"]) == ["cio-worker"]

        args = build_parser().parse_args([str(a) for a in container["args"]])

        assert args.command in ("run", "replay", "dlq", "offsets", "archive")


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_deploy_environment_names_real_settings_and_secrets_come_from_secrets(
    workload: str,
) -> None:
    """Every CIO_ variable is a setting; credentials are secretKeyRefs only."""
    for container in pod_spec(WORKLOADS[workload])["containers"]:
        env = environment(container)

        unknown = sorted(set(env) - SETTING_VARIABLES)
        assert not unknown, f"{workload}: not settings: {unknown}"
        for name in SECRET_VARIABLES & set(env):
            assert "secretKeyRef" in env[name].get("valueFrom", {}), name
        assert {"CIO_SITE_ID", "CIO_API_KEY"} <= set(env)


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_deploy_workload_runs_as_the_image_s_non_root_user(workload: str) -> None:
    """runAsNonRoot with the uid the Dockerfile's USER names; no escalation."""
    spec = pod_spec(WORKLOADS[workload])
    user = re.search(r"^USER (\d+)", DOCKERFILE.read_text(), re.MULTILINE)

    assert user is not None
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == int(user.group(1))
    for container in spec["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]["memory"]


@pytest.mark.parametrize("workload", sorted(WORKLOADS))
def test_deploy_grace_period_outlasts_the_worker_s_shutdown(workload: str) -> None:
    """terminationGracePeriodSeconds is above the worker's own shutdown: its
    shutdown_timeout_s for batches in flight plus a last commit's timeout."""
    spec = pod_spec(WORKLOADS[workload])
    for container in spec["containers"]:
        shutdown_s = float(
            literal(
                container,
                "CIO_TRACK__SHUTDOWN_TIMEOUT_S",
                TrackSettings().shutdown_timeout_s,
            )
        )

        needed_s = shutdown_s + committer.TRANSACTION_TIMEOUT_S

        assert spec["terminationGracePeriodSeconds"] > needed_s


def test_deployment_probes_ask_health_paths_on_the_metrics_port() -> None:
    """Liveness asks /healthz, readiness /readyz, on the port the worker serves
    ([metrics] port, or CIO_METRICS__PORT when the container sets it)."""
    (deployment,) = of_kind("Deployment")
    (container,) = pod_spec(deployment)["containers"]
    port = int(literal(container, "CIO_METRICS__PORT", MetricsSettings().port))
    named = {p["name"]: p["containerPort"] for p in container["ports"]}

    for probe, path in (
        ("livenessProbe", HEALTHZ_PATH),
        ("readinessProbe", READYZ_PATH),
    ):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert named.get(get["port"], get["port"]) == port
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(port)
    assert annotations["prometheus.io/path"] == "/metrics"
    assert literal(container, "CIO_METRICS__HOST", MetricsSettings().host) != (
        "127.0.0.1"
    ), "the kubelet probes the pod's address, not its loopback"


def test_deployment_gives_static_membership_and_transactional_id_from_pod_name() -> (
    None
):
    """CIO_KAFKA__GROUP_INSTANCE_ID and CIO_STATE__TRANSACTIONAL_ID come from
    the downward API's metadata.name."""
    (deployment,) = of_kind("Deployment")
    (container,) = pod_spec(deployment)["containers"]
    env = environment(container)

    for name in ("CIO_KAFKA__GROUP_INSTANCE_ID", "CIO_STATE__TRANSACTIONAL_ID"):
        assert env[name]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_deployment_leaves_the_replica_count_to_keda() -> None:
    """With a ScaledObject on it, the Deployment sets no replicas of its own
    (an apply would otherwise reset what KEDA chose)."""
    (deployment,) = of_kind("Deployment")

    assert "replicas" not in deployment["spec"]


def test_pdb_selects_the_deployment_s_pods() -> None:
    """The PodDisruptionBudget's selector matches the pod template's labels."""
    (deployment,) = of_kind("Deployment")
    (pdb,) = of_kind("PodDisruptionBudget")
    labels = deployment["spec"]["template"]["metadata"]["labels"]

    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1


def _kafka_triggers(document: dict[str, Any]) -> list[dict[str, Any]]:
    triggers = document["spec"]["triggers"]
    assert triggers
    assert all(t["type"] == "kafka" for t in triggers)
    return [t["metadata"] for t in triggers]


@pytest.mark.parametrize("kind", ["ScaledObject", "ScaledJob"])
def test_keda_triggers_watch_the_worker_s_group_and_input_topics(kind: str) -> None:
    """bootstrapServers, consumerGroup, topic and lagThreshold are set; the
    group and topics are the ones the workload's settings name."""
    (scaler,) = of_kind(kind)
    if kind == "ScaledObject":
        (target,) = of_kind("Deployment")
        assert scaler["spec"]["scaleTargetRef"]["name"] == target["metadata"]["name"]
    else:
        target = scaler
    (container,) = pod_spec(target)["containers"]
    defaults = KafkaSettings()
    group = literal(container, "CIO_KAFKA__GROUP_ID", defaults.group_id)
    topics = {
        literal(container, "CIO_KAFKA__PERSON_TOPIC", defaults.person_topic),
        literal(container, "CIO_KAFKA__EVENT_TOPIC", defaults.event_topic),
    }
    servers = literal(
        container, "CIO_KAFKA__BOOTSTRAP_SERVERS", defaults.bootstrap_servers
    )

    triggers = _kafka_triggers(scaler)

    assert {t["topic"] for t in triggers} == topics
    for trigger in triggers:
        assert trigger["consumerGroup"] == group
        assert trigger["bootstrapServers"] == servers
        assert int(trigger["lagThreshold"]) > 0


def test_scaled_object_never_scales_past_the_partition_count() -> None:
    """maxReplicaCount is at most the partitions of an input topic."""
    (scaled,) = of_kind("ScaledObject")
    partitions = int(
        scaled["metadata"]["annotations"]["cio-worker/partitions-per-input-topic"]
    )

    assert 1 <= scaled["spec"]["minReplicaCount"] <= scaled["spec"]["maxReplicaCount"]
    assert scaled["spec"]["maxReplicaCount"] <= partitions
    for trigger in _kafka_triggers(scaled):
        assert trigger.get("allowIdleConsumers", "false") == "false"


def test_scaled_job_runs_until_caught_up_without_static_membership() -> None:
    """Jobs exit when caught up, are not restarted in place, and do not hold
    partitions as static members after they exit."""
    (scaled,) = of_kind("ScaledJob")
    spec = pod_spec(scaled)
    (container,) = spec["containers"]

    args = build_parser().parse_args(container["args"])

    assert args.command == "run"
    assert args.until_caught_up
    assert spec["restartPolicy"] == "Never"
    assert "CIO_KAFKA__GROUP_INSTANCE_ID" not in environment(container)


def test_replay_job_replays_an_input_topic_from_a_time() -> None:
    """The replay Job's --topic is an input topic and it starts at a time."""
    jobs = [
        j for j in of_kind("Job") if "replay" in pod_spec(j)["containers"][0]["args"]
    ]
    (job,) = jobs
    (container,) = pod_spec(job)["containers"]
    defaults = KafkaSettings()

    args = build_parser().parse_args(container["args"])

    assert args.topic in (defaults.person_topic, defaults.event_topic)
    assert args.from_time
    assert pod_spec(job)["restartPolicy"] == "Never"
    assert "CIO_KAFKA__GROUP_INSTANCE_ID" not in environment(container)


# -- the alert rules ------------------------------------------------------------


def alert_rules() -> list[dict[str, Any]]:
    document = yaml.safe_load((DEPLOY / "alerts.yaml").read_text(encoding="utf-8"))
    return [rule for group in document["groups"] for rule in group["rules"]]


def exported_names() -> set[str]:
    """Every sample name the worker can export (counters, histograms, gauges)."""
    from prometheus_client import generate_latest
    from prometheus_client.parser import text_string_to_metric_families

    metrics = Metrics()
    metrics.observe_request(200, 0.1, 1, 100)
    metrics.record_retry(ThrottledError(429, None), 1)
    metrics.record_rate_limit_wait(1)
    metrics.record_consumed("t")
    metrics.record_batch("t", 1, 1)
    metrics.record_dead_lettered("t", "api", "r")
    metrics.set_lag("t", 0, 1)
    text = generate_latest(metrics.registry).decode()
    return {
        sample.name
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_alerts_cover_the_runbook_s_conditions() -> None:
    """Lag growing, dead-letter rate, credentials paused, not ready, no heartbeat."""
    names = {rule["alert"] for rule in alert_rules()}

    assert {
        "CioWorkerLagGrowing",
        "CioWorkerDeadLetterRate",
        "CioWorkerCredentialsPaused",
        "CioWorkerNotReady",
        "CioWorkerNoHeartbeat",
    } <= names


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_rule_uses_only_metrics_the_worker_exports(rule: dict[str, Any]) -> None:
    """Each expression names exported series; each rule has a severity, a
    summary and a runbook anchor that docs/operations.md has."""
    used = set(re.findall(r"\b(cio_worker_[a-z_]+)\b", rule["expr"]))
    anchors = {
        _anchor(heading)
        for heading in re.findall(r"^#+ (.+)$", OPERATIONS_DOC.read_text(), re.M)
    }

    assert used
    assert used <= exported_names()
    assert rule["for"]
    assert rule["labels"]["severity"] in ("warning", "critical")
    assert rule["annotations"]["summary"]
    assert rule["annotations"]["runbook"].split("#")[1] in anchors


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


# -- the runbook's command lines ------------------------------------------------


def runbook_commands() -> list[list[str]]:
    """Every line of the runbook's shell blocks that runs cio-worker."""
    text = OPERATIONS_DOC.read_text(encoding="utf-8")
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words[:1] == ["cio-worker"]:
                commands.append(words[1:])
    return commands


def test_runbook_has_commands_to_check() -> None:
    assert len(runbook_commands()) >= 5


@pytest.mark.parametrize("argv", runbook_commands(), ids=" ".join)
def test_runbook_command_parses_with_the_cli(argv: list[str]) -> None:
    """The runbook's commands are ones the CLI accepts, options and all."""
    build_parser().parse_args(argv)


# -- the CLI: --help everywhere, config show masks every secret -----------------


def subcommand_paths(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    """The argument path of every command and sub-command of the parser."""
    yield prefix
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from subcommand_paths(sub, (*prefix, name))


@pytest.mark.parametrize(
    "path", list(subcommand_paths(build_parser())), ids=lambda p: " ".join(p) or "-"
)
def test_cli_help_works_on_every_command(
    path: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """`cio-worker ... --help` prints usage and exits 0 for every command."""
    with pytest.raises(SystemExit) as exit_info:
        main([*path, "--help"])

    out = capsys.readouterr().out
    assert exit_info.value.code == 0
    assert out.startswith("usage: cio-worker")


SECRETS = {
    "CIO_API_KEY": "apikey-4f1b9c-do-not-show",
    "CIO_SITE_ID": "siteid-7e2d10-do-not-show",
    "CIO_SCHEMAS__REGISTRY_PASSWORD": "registrypw-91ac3e-do-not-show",
    "CIO_ARCHIVE__SECRET_ACCESS_KEY": "s3secret-0b77fd-do-not-show",
    "CIO_ARCHIVE__ACCESS_KEY_ID": "AKIA5EXAMPLEDONOTSHOW",
}
SASL_PASSWORD = "saslpw-c3d9e8-do-not-show"  # noqa: S105


def test_config_show_masks_every_secret(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    """With every secret set to a distinctive value, `config show` prints the
    effective settings and none of those values, whole or in part."""
    monkeypatch.chdir(tmp_path)
    # The process-wide structlog set-up would outlive this test.
    monkeypatch.setattr("worker.cli.configure_logging", lambda *_: None)
    for name, value in SECRETS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(
        "CIO_KAFKA__PROPERTIES",
        json.dumps(
            {
                "security.protocol": "SASL_SSL",
                "sasl.username": "cio-worker",
                "sasl.password": SASL_PASSWORD,
            }
        ),
    )
    monkeypatch.setenv("CIO_SCHEMAS__REGISTRY_URL", "https://registry.example.com")
    monkeypatch.setenv("CIO_SCHEMAS__REGISTRY_USERNAME", "reader")

    code = main(["config", "show"])

    captured = capsys.readouterr()
    shown = json.loads(captured.out)
    assert code == 0
    for secret in [*SECRETS.values(), SASL_PASSWORD]:
        for text in (captured.out, captured.err):
            assert secret not in text
            assert secret[:12] not in text
    assert shown["kafka"]["properties"]["sasl.username"] == "cio-worker"
    assert shown["metrics"]["port"] == MetricsSettings().port
