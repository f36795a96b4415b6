//! The Kubernetes manifests (`k8s/`) as a cluster would take them: `kubectl kustomize` renders
//! them, `kubernetes-validate --strict` checks every built-in object against the Kubernetes
//! schemas offline, and the custom resources it has no schema for (KEDA's ScaledObject, the
//! Prometheus operator's ServiceMonitor and PrometheusRule; skipped there by name) are checked
//! here against what they must agree with: the Deployments, Services, partition count, consumer
//! groups and the shipped alert rules. `.ci/run` installs both tools.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use callisto_core::config::Settings;
use callisto_projectors::ProjectorSettings;
use serde_yaml_ng::Value;

/// The Kubernetes version the manifests are validated against: the oldest one still supported
/// by the major providers when this was written.
const KUBERNETES_VERSION: &str = "1.30.0";

/// Custom resources that kubernetes-validate has no schema for.
const CUSTOM_KINDS: [&str; 3] = ["ScaledObject", "ServiceMonitor", "PrometheusRule"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `variable`'s value, or `default` when it runs; `None` (a skip) where neither is installed.
fn tool(variable: &str, default: &str, install: &str) -> Option<String> {
    let program = std::env::var(variable).unwrap_or_else(|_| default.to_owned());
    if Command::new(&program).arg("--help").output().is_ok() {
        return Some(program);
    }
    assert!(std::env::var_os("CALLISTO_REQUIRE_PEERS").is_none(), "{default} is required here: {install}");
    eprintln!("skipped: {install} (or set {variable}) to run");
    None
}

fn render(kubectl: &str) -> String {
    let output = Command::new(kubectl).args(["kustomize"]).arg(repo().join("k8s")).output().unwrap();
    assert!(output.status.success(), "kubectl kustomize: {}", String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout).unwrap()
}

fn documents(rendered: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml_ng::Deserializer::from_str(rendered).map(|doc| Value::deserialize(doc).unwrap()).collect()
}

fn text<'a>(value: &'a Value, path: &[&str]) -> &'a str {
    at(value, path).as_str().unwrap_or_else(|| panic!("{path:?} is not text"))
}

fn at<'a>(value: &'a Value, path: &[&str]) -> &'a Value {
    path.iter().fold(value, |v, key| &v[*key])
}

fn of_kind<'a>(docs: &'a [Value], kind: &str) -> Vec<&'a Value> {
    docs.iter().filter(|d| d["kind"].as_str() == Some(kind)).collect()
}

fn names(docs: &[&Value]) -> BTreeSet<String> {
    docs.iter().map(|d| text(d, &["metadata", "name"]).to_owned()).collect()
}

#[test]
fn manifests_render_and_validate_against_the_kubernetes_schemas() {
    let Some(kubectl) = tool("CALLISTO_KUBECTL", "kubectl", "install kubectl (Debian kubernetes-client)") else {
        return;
    };
    let Some(validate) =
        tool("CALLISTO_KUBERNETES_VALIDATE", "kubernetes-validate", "pip install kubernetes-validate==1.37.0")
    else {
        return;
    };
    let rendered = render(&kubectl);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("rendered.yaml");
    std::fs::write(&file, &rendered).unwrap();
    let output = Command::new(&validate)
        .args(["--strict", "--kubernetes-version", KUBERNETES_VERSION])
        .arg(&file)
        .output()
        .unwrap();
    let report = format!("{}{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr));
    assert!(output.status.success(), "kubernetes-validate:\n{report}");

    let docs = documents(&rendered);
    let builtin = docs.iter().filter(|d| !CUSTOM_KINDS.contains(&d["kind"].as_str().unwrap())).count();
    let passed = report.lines().filter(|l| l.contains(" passed for resource ")).count();
    assert_eq!(passed, builtin, "every built-in object was validated:\n{report}");
    // Only the custom resources go without a schema; a typo in a built-in kind or apiVersion
    // would land here too, and fail.
    let unchecked: BTreeSet<&str> = report
        .lines()
        .filter_map(|l| l.split("Couldn't find schema for kind ").nth(1))
        .map(|rest| rest.split_whitespace().next().unwrap())
        .collect();
    assert_eq!(unchecked, BTreeSet::from(CUSTOM_KINDS), "{report}");
}

#[test]
fn workloads_are_hardened_scaled_and_monitored() {
    let Some(kubectl) = tool("CALLISTO_KUBECTL", "kubectl", "install kubectl (Debian kubernetes-client)") else {
        return;
    };
    let docs = documents(&render(&kubectl));
    let deployments = of_kind(&docs, "Deployment");
    assert_eq!(
        names(&deployments),
        BTreeSet::from(["callisto-writer", "callisto-projector", "callisto-query-api"].map(String::from))
    );

    for deployment in &deployments {
        let name = text(deployment, &["metadata", "name"]);
        let pod = at(deployment, &["spec", "template", "spec"]);
        assert_eq!(pod["securityContext"]["runAsNonRoot"], Value::Bool(true), "{name}");
        assert!(pod["securityContext"]["runAsUser"].as_u64().is_some_and(|uid| uid > 0), "{name}");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"].as_str(), Some("RuntimeDefault"), "{name}");
        assert_eq!(pod["automountServiceAccountToken"], Value::Bool(false), "{name}");
        for container in pod["containers"].as_sequence().unwrap() {
            let security = &container["securityContext"];
            assert_eq!(security["readOnlyRootFilesystem"], Value::Bool(true), "{name}");
            assert_eq!(security["allowPrivilegeEscalation"], Value::Bool(false), "{name}");
            assert_eq!(security["capabilities"]["drop"][0].as_str(), Some("ALL"), "{name}");
            for bound in ["requests", "limits"] {
                for resource in ["cpu", "memory"] {
                    assert!(!container["resources"][bound][resource].is_null(), "{name}: {bound}.{resource}");
                }
            }
            // A read-only root needs somewhere to write: the data dir and /tmp are volumes.
            let mounts: BTreeSet<&str> =
                container["volumeMounts"].as_sequence().unwrap().iter().map(|m| text(m, &["mountPath"])).collect();
            assert!(mounts.contains("/var/lib/callisto") && mounts.contains("/tmp"), "{name}: {mounts:?}");
        }
    }

    // Every Deployment has a disruption budget, and the stateless ones a CPU autoscaler.
    let budgets = of_kind(&docs, "PodDisruptionBudget");
    assert_eq!(names(&budgets), names(&deployments));
    let autoscaled: BTreeSet<String> = of_kind(&docs, "HorizontalPodAutoscaler")
        .iter()
        .map(|hpa| text(hpa, &["spec", "scaleTargetRef", "name"]).to_owned())
        .collect();
    assert_eq!(autoscaled, BTreeSet::from(["callisto-writer", "callisto-query-api"].map(String::from)));

    // Projectors scale on each projection's consumer-group lag, never past the partition count.
    let scaled = of_kind(&docs, "ScaledObject");
    assert_eq!(scaled.len(), 1);
    let scaled = scaled[0];
    assert_eq!(text(scaled, &["spec", "scaleTargetRef", "name"]), "callisto-projector");
    let settings = Settings::default();
    assert_eq!(scaled["spec"]["maxReplicaCount"].as_u64(), Some(u64::from(settings.log.partitions)));
    let group = ProjectorSettings::new(&settings.log.topic).group;
    let mut groups = BTreeSet::new();
    for trigger in scaled["spec"]["triggers"].as_sequence().unwrap() {
        assert_eq!(text(trigger, &["type"]), "kafka");
        assert_eq!(text(trigger, &["metadata", "topic"]), settings.log.topic);
        assert_eq!(text(trigger, &["metadata", "allowIdleConsumers"]), "false");
        groups.insert(text(trigger, &["metadata", "consumerGroup"]).to_owned());
    }
    assert_eq!(groups, BTreeSet::from(["documents", "search"].map(|p| format!("{group}.{p}"))));

    // Deny by default; the HTTP services admit only the gateway (and Prometheus).
    let policies = of_kind(&docs, "NetworkPolicy");
    let deny_all = policies.iter().find(|p| {
        at(p, &["spec", "podSelector"]).as_mapping().is_some_and(|m| m.is_empty())
            && at(p, &["spec", "ingress"]).is_null()
            && at(p, &["spec", "egress"]).is_null()
    });
    let deny_all = deny_all.expect("a default-deny NetworkPolicy");
    assert_eq!(at(deny_all, &["spec", "policyTypes"]).as_sequence().map(Vec::len), Some(2));

    // The ServiceMonitor finds every Service by its labels and port name.
    let services = of_kind(&docs, "Service");
    assert_eq!(services.len(), 3);
    let monitor = of_kind(&docs, "ServiceMonitor")[0];
    let selector = at(monitor, &["spec", "selector", "matchLabels"]).as_mapping().unwrap();
    let port = text(&monitor["spec"]["endpoints"][0], &["port"]);
    for service in &services {
        for (key, value) in selector {
            assert_eq!(&service["metadata"]["labels"][key.as_str().unwrap()], value, "{service:?}");
        }
        let ports = service["spec"]["ports"].as_sequence().unwrap();
        assert!(ports.iter().any(|p| p["name"].as_str() == Some(port)), "{service:?}");
    }

    // The PrometheusRule carries exactly the alert rules promtool checks and unit-tests.
    let shipped: Value =
        serde_yaml_ng::from_str(&std::fs::read_to_string(repo().join("deploy/prometheus/alerts.yml")).unwrap())
            .unwrap();
    let rule = of_kind(&docs, "PrometheusRule")[0];
    assert_eq!(rule["spec"]["groups"], shipped["groups"], "k8s/monitoring.yaml and alerts.yml disagree");
}
