//! The published manifests apply to a real API server with kubectl.

use std::path::{Path, PathBuf};
use std::process::Command;

use acrpull_testkit::control_plane;

/// Returns the kubectl built with the control plane, else the one on PATH.
fn kubectl() -> PathBuf {
    std::env::var_os("ACRPULL_CONTROL_PLANE_BIN")
        .map(|dir| PathBuf::from(dir).join("kubectl"))
        .filter(|path| path.exists())
        .unwrap_or_else(|| PathBuf::from("kubectl"))
}

fn apply(kubeconfig: &Path, files: &[&str]) -> String {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut command = Command::new(kubectl());
    command.arg("--kubeconfig").arg(kubeconfig).arg("apply");
    for file in files {
        command.arg("-f").arg(root.join(file));
    }
    let output = command.output().expect("kubectl runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    assert!(
        output.status.success(),
        "kubectl apply failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn crd_and_deployment_apply_with_kubectl() {
    let control_plane = control_plane::shared().await;
    let kubeconfig = control_plane.kubeconfig_path();

    let output = apply(kubeconfig, &["deploy/latest/crd.yaml"]);
    assert!(
        output.contains("acrpullbindings.msi-acrpull.microsoft.com"),
        "{output}"
    );

    let output = apply(kubeconfig, &["deploy/latest/deploy.yaml"]);
    for object in [
        "namespace/msi-acrpull-system",
        "serviceaccount/msi-acrpull-controller",
        "clusterrole.rbac.authorization.k8s.io/msi-acrpull-controller",
        "deployment.apps/msi-acrpull-controller-manager",
    ] {
        assert!(output.contains(object), "{object} missing from:\n{output}");
    }

    // Applying again changes nothing.
    let again = apply(
        kubeconfig,
        &["deploy/latest/crd.yaml", "deploy/latest/deploy.yaml"],
    );
    assert!(!again.contains("configured"), "{again}");
}
