//! The Fission spec folders kept side by side (deploy/fission): `specs` (Fission 1.27, validated
//! against its CRDs in CI), `specs-1.20` (the seed's Fission, whose CRDs CI does not have) and
//! `specs-container` (the container executor). What differs between them is named here, so a
//! change to one folder that is not carried to the others fails.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The TimeTrigger fields Fission 1.20 does not have (its CRD rejects them, its CLI drops them).
const FIELDS_MISSING_IN_1_20: [&str; 2] = ["method", "subpath"];

fn folder(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../deploy/fission")
        .join(name)
}

fn yaml_files(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml"))
        .collect()
}

/// The file without its comment lines (they explain each folder's differences).
fn content(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(str::to_owned)
        .collect()
}

/// A top-level field of a resource's `spec` (two spaces in).
fn spec_field(line: &str) -> Option<&str> {
    line.strip_prefix("  ")
        .filter(|rest| !rest.starts_with(' '))
        .and_then(|rest| rest.split(':').next())
}

#[test]
fn the_1_20_specs_are_the_current_ones_without_the_timetrigger_fields_1_20_lacks() {
    let current = folder("specs");
    let old = folder("specs-1.20");
    assert_eq!(yaml_files(&current), yaml_files(&old), "the same files");
    for name in yaml_files(&current) {
        let now = content(&current.join(&name));
        let then = content(&old.join(&name));
        if name.starts_with("timetrigger-") {
            let dropped: Vec<&str> = now
                .iter()
                .filter_map(|l| spec_field(l))
                .filter(|f| !then.iter().any(|l| spec_field(l) == Some(f)))
                .collect();
            assert_eq!(dropped, FIELDS_MISSING_IN_1_20, "{name}");
            let kept: Vec<&String> = now
                .iter()
                .filter(|l| spec_field(l).is_none_or(|f| !FIELDS_MISSING_IN_1_20.contains(&f)))
                .collect();
            assert_eq!(kept, then.iter().collect::<Vec<_>>(), "{name}");
        } else {
            assert_eq!(now, then, "{name} differs between specs and specs-1.20");
        }
    }
}

#[test]
fn the_container_specs_run_the_same_functions_with_their_configmaps_as_environment_variables() {
    let current = folder("specs");
    let container = folder("specs-container");
    for name in yaml_files(&current) {
        if name.starts_with("route-")
            || name.starts_with("timetrigger-")
            || name == "fission-deployment-config.yaml"
        {
            assert_eq!(
                content(&current.join(&name)),
                content(&container.join(&name)),
                "{name}"
            );
        }
        let Some(function) = name
            .strip_prefix("function-")
            .and_then(|n| n.strip_suffix(".yaml"))
        else {
            continue;
        };
        let original = content(&current.join(&name)).join("\n");
        let configmaps = original
            .split("configmaps:")
            .nth(1)
            .and_then(|s| s.split("secrets:").next())
            .unwrap_or("");
        let secrets = original
            .split("secrets:")
            .nth(1)
            .and_then(|s| s.split("InvokeStrategy:").next())
            .unwrap_or("");
        let spec = content(&container.join(&name)).join("\n");
        assert!(spec.contains("ExecutorType: container"), "{name}");
        assert!(
            spec.contains(&format!("command:\n      - /usr/local/bin/{function}\n")),
            "{name}: runs its own binary"
        );
        assert!(
            spec.contains("- name: ENTWINE_FUNCTION_LISTEN\n        value: 0.0.0.0:8888"),
            "{name}"
        );
        assert!(spec.contains("containerPort: 8888"), "{name}");
        // Every key of the ConfigMaps the function lists, under its ENTWINE_ variable.
        for (configmap, keys) in [
            ("postgres", &["database", "user", "host", "port"][..]),
            (
                "odte",
                &[
                    "expected_update_rate",
                    "time_window",
                    "desired_timeliness",
                    "threshold",
                ][..],
            ),
            (
                "digital",
                &["broker_url", "state_topic", "lifecycle_topic"][..],
            ),
            ("mqtt", &["ca_file"][..]),
        ] {
            let listed =
                configmaps.contains(&format!("- {{name: {configmap}, namespace: default}}"));
            for key in keys {
                let variable = format!(
                    "- name: ENTWINE_{}__{}\n        valueFrom:\n          configMapKeyRef:\n            name: {configmap}\n            key: {key}",
                    configmap.to_uppercase(),
                    key.to_uppercase()
                );
                assert_eq!(
                    spec.contains(&variable),
                    listed,
                    "{name}: {configmap}.{key} as ENTWINE_{}__{}",
                    configmap.to_uppercase(),
                    key.to_uppercase()
                );
            }
        }
        // The Secrets are files where the functions look for them, never variables.
        for secret in ["postgres", "auth", "mqtt", "physical-broker-ca"] {
            let listed = secrets.contains(&format!("- {{name: {secret}, namespace: default}}"));
            assert_eq!(
                spec.contains(&format!("mountPath: /secrets/default/{secret}\n")),
                listed,
                "{name}: Secret {secret}"
            );
        }
        assert!(!spec.contains("secretKeyRef"), "{name}");
    }
}
