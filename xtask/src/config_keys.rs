//! `cargo xtask config-keys EXAMPLE.yaml`: the key paths and value types of a
//! bridge's example config, one `path<TAB>type` line each, in file order.
//! The bridge tests check rendered configs against these lists
//! (tests/fixtures/bridge-config-keys/), made from the upstream example config of
//! the version an image pins (for a Go bridge, what `<bridge> -e` prints).

use std::fs;

use anyhow::{bail, Context, Result};
use serde_yaml::Value;

pub fn run(args: &[String]) -> Result<()> {
    let [file] = args else {
        bail!("usage: cargo xtask config-keys EXAMPLE-CONFIG.yaml");
    };
    let text = fs::read_to_string(file).with_context(|| format!("reading {file}"))?;
    let doc: Value = serde_yaml::from_str(&text).with_context(|| format!("parsing {file}"))?;
    let mut lines = Vec::new();
    walk("", &doc, &mut lines);
    for line in lines {
        println!("{line}");
    }
    Ok(())
}

/// The type names the tests compare: map, list, str, int, float, bool, null.
pub fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Mapping(_) => "map",
        Value::Sequence(_) => "list",
        Value::String(_) => "str",
        Value::Number(n) if n.is_f64() => "float",
        Value::Number(_) => "int",
        Value::Bool(_) => "bool",
        Value::Null => "null",
        Value::Tagged(_) => "tagged",
    }
}

fn walk(prefix: &str, v: &Value, out: &mut Vec<String>) {
    let Value::Mapping(map) = v else { return };
    for (k, child) in map {
        let key = match k {
            Value::String(s) => s.clone(),
            other => serde_yaml::to_string(other)
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        let path = if prefix.is_empty() {
            key
        } else {
            format!("{prefix}.{key}")
        };
        out.push(format!("{path}\t{}", type_name(child)));
        walk(&path, child, out);
    }
}
