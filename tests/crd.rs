//! The committed CRD must match the one generated from the Rust types.

use std::path::Path;

#[test]
fn committed_crd_matches_generated() {
    let generated = acrpull::crd::render_yaml().expect("the CRD renders");
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy/latest/crd.yaml");
    let committed = std::fs::read_to_string(&path).expect("deploy/latest/crd.yaml exists");
    assert!(
        committed == generated,
        "deploy/latest/crd.yaml is out of date; regenerate it with `cargo run -- crd > deploy/latest/crd.yaml`"
    );
}

#[test]
fn crd_has_printer_columns_and_descriptions() {
    let definitions = acrpull::crd::definitions();
    let version = &definitions[0].spec.versions[0];
    let columns: Vec<&str> = version
        .additional_printer_columns
        .iter()
        .flatten()
        .map(|column| column.name.as_str())
        .collect();
    assert!(columns.contains(&"Ready"), "{columns:?}");
    assert!(columns.contains(&"Expires"), "{columns:?}");

    let schema = serde_json::to_value(&version.schema).unwrap();
    let description =
        &schema["openAPIV3Schema"]["properties"]["spec"]["properties"]["acrServer"]["description"];
    assert!(
        description
            .as_str()
            .is_some_and(|text| text.contains("registry")),
        "{description}"
    );
}
