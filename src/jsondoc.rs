//! JSON documents a layer declares in `layer.toml` (`[json."<path>"]`):
//! a TOML table turned into JSON by serde, never by pasting text. String
//! leaves may refer to site values as `${name}`: a leaf that is exactly
//! `${name}` takes the value with its type; otherwise the value's text is
//! spliced into the string. A leaf whose value is unset (an optional value)
//! is dropped, and so is a table left empty by that.

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};

/// Builds the document; `Err` names the problem (an undeclared value).
pub fn build(table: &toml::Table, values: &BTreeMap<String, Json>) -> Result<Json, String> {
    Ok(convert(&toml::Value::Table(table.clone()), values)?
        .unwrap_or_else(|| Json::Object(Map::new())))
}

/// The values a document refers to.
pub fn references(table: &toml::Table) -> Vec<String> {
    let mut out = Vec::new();
    collect(&toml::Value::Table(table.clone()), &mut out);
    out
}

fn collect(v: &toml::Value, out: &mut Vec<String>) {
    match v {
        toml::Value::String(s) => out.extend(names_in(s)),
        toml::Value::Array(items) => items.iter().for_each(|i| collect(i, out)),
        toml::Value::Table(t) => t.values().for_each(|i| collect(i, out)),
        _ => {}
    }
}

fn names_in(s: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        let Some(len) = rest[start..].find('}') else {
            break;
        };
        names.push(rest[start + 2..start + len].to_string());
        rest = &rest[start + len + 1..];
    }
    names
}

/// `None` means "leave this out".
fn convert(v: &toml::Value, values: &BTreeMap<String, Json>) -> Result<Option<Json>, String> {
    Ok(match v {
        toml::Value::String(s) => string_leaf(s, values)?,
        toml::Value::Integer(i) => Some(Json::from(*i)),
        toml::Value::Float(f) => Some(Json::from(*f)),
        toml::Value::Boolean(b) => Some(Json::Bool(*b)),
        toml::Value::Datetime(d) => Some(Json::String(d.to_string())),
        toml::Value::Array(items) => {
            let mut out = Vec::new();
            for item in items {
                if let Some(j) = convert(item, values)? {
                    out.push(j);
                }
            }
            Some(Json::Array(out))
        }
        toml::Value::Table(t) => {
            let mut out = Map::new();
            for (k, item) in t {
                if let Some(j) = convert(item, values)? {
                    out.insert(k.clone(), j);
                }
            }
            (!out.is_empty()).then_some(Json::Object(out))
        }
    })
}

fn lookup<'a>(name: &str, values: &'a BTreeMap<String, Json>) -> Result<&'a Json, String> {
    values
        .get(name)
        .ok_or_else(|| format!("uses ${{{name}}}, which the layer does not declare"))
}

fn string_leaf(s: &str, values: &BTreeMap<String, Json>) -> Result<Option<Json>, String> {
    if let Some(name) = s.strip_prefix("${").and_then(|r| r.strip_suffix('}')) {
        if !name.contains("${") && !name.contains('}') {
            let v = lookup(name, values)?;
            return Ok((!v.is_null()).then(|| v.clone()));
        }
    }
    let mut text = String::new();
    let mut rest = s;
    while let Some(start) = rest.find("${") {
        let len = rest[start..]
            .find('}')
            .ok_or_else(|| format!("has an unclosed ${{ in {s:?}"))?;
        text.push_str(&rest[..start]);
        match lookup(&rest[start + 2..start + len], values)? {
            Json::Null => return Ok(None),
            Json::String(v) => text.push_str(v),
            other => text.push_str(&other.to_string()),
        }
        rest = &rest[start + len + 1..];
    }
    text.push_str(rest);
    Ok(Some(Json::String(text)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn doc(toml_text: &str, values: Json) -> Result<Json, String> {
        let values: BTreeMap<String, Json> = serde_json::from_value(values).unwrap();
        build(&toml::from_str(toml_text).unwrap(), &values)
    }

    #[test]
    fn well_known_client_with_and_without_optional_keys() {
        let spec = r#"
            "m.homeserver" = { base_url = "https://${matrix_host}" }
            "m.identity_server" = { base_url = "${identity_server}" }
            "im.vector.riot.jitsi" = { preferredDomain = "${jitsi}" }
        "#;
        let full = doc(spec, json!({"matrix_host": "matrix.example.org", "identity_server": "https://vector.im", "jitsi": "jitsi.example.org"})).unwrap();
        assert_eq!(
            full,
            json!({
                "m.homeserver": {"base_url": "https://matrix.example.org"},
                "m.identity_server": {"base_url": "https://vector.im"},
                "im.vector.riot.jitsi": {"preferredDomain": "jitsi.example.org"},
            })
        );
        let bare = doc(
            spec,
            json!({"matrix_host": "m.example.org", "identity_server": null, "jitsi": null}),
        )
        .unwrap();
        assert_eq!(
            bare,
            json!({"m.homeserver": {"base_url": "https://m.example.org"}})
        );
    }

    #[test]
    fn typed_leaves_and_quoting() {
        let d = doc(
            r#"a = "${flag}"
b = "${port}"
c = "x${name}y"
"#,
            json!({"flag": true, "port": 8448, "name": "\"q\""}),
        )
        .unwrap();
        assert_eq!(d, json!({"a": true, "b": 8448, "c": "x\"q\"y"}));
        assert_eq!(
            serde_json::to_string(&d).unwrap(),
            r#"{"a":true,"b":8448,"c":"x\"q\"y"}"#
        );
    }

    #[test]
    fn undeclared_values_are_refused() {
        let err = doc(
            r#""m.server" = "${matrix_hots}:443""#,
            json!({"matrix_host": "m"}),
        )
        .unwrap_err();
        assert!(err.contains("${matrix_hots}"), "{err}");
        assert_eq!(
            references(&toml::from_str(r#"a = { b = "${x}:${y}" }"#).unwrap()),
            ["x", "y"]
        );
    }
}
