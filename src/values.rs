//! Site values: their declared types, parsing from TOML or `--set` text,
//! validation, defaults (which may refer to other values as `${name}`), and
//! resolution in precedence order: layer default < profile < site file <
//! `--set`. Every problem is collected and reported at once.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value as Json;

use crate::error::{did_you_mean, UsageError};
use crate::names;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    String,
    Int,
    Bool,
    Port,
    Hostname,
    ServerName,
    Email,
    Url,
    Enum,
    List,
    Size,
}

impl Kind {
    /// What a valid value looks like, for error messages and listings.
    pub fn hint(self) -> &'static str {
        match self {
            Kind::String => "text without control characters",
            Kind::Int => "a whole number",
            Kind::Bool => "true or false",
            Kind::Port => "a port number from 1 to 65535",
            Kind::Hostname => "a DNS host name such as matrix.example.org",
            Kind::ServerName => "a Matrix server name: host[:port], e.g. example.org",
            Kind::Email => "an e-mail address such as admin@example.org",
            Kind::Url => "an https:// URL",
            Kind::Enum => "one of the listed choices",
            Kind::List => "a list (in --set: comma-separated)",
            Kind::Size => "a size such as 50M (digits with an optional K, M or G)",
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::String => "string",
            Kind::Int => "int",
            Kind::Bool => "bool",
            Kind::Port => "port",
            Kind::Hostname => "hostname",
            Kind::ServerName => "server_name",
            Kind::Email => "email",
            Kind::Url => "url",
            Kind::Enum => "enum",
            Kind::List => "list",
            Kind::Size => "size",
        }
    }
}

/// A site value as a layer declares it in `[values.<name>]`.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ValueSpec {
    #[serde(rename = "type")]
    pub kind: Kind,
    /// No default means the value is required.
    pub default: Option<toml::Value>,
    pub description: String,
    /// For `enum`, and for a `list` of `enum` items.
    #[serde(default)]
    pub choices: Vec<String>,
    /// The item type of a `list`.
    pub items: Option<Kind>,
    pub min: Option<i64>,
    pub max: Option<i64>,
    /// For `string`: a regular expression the whole value must match.
    pub pattern: Option<String>,
    /// Never printed, logged or recorded in the manifest.
    #[serde(default)]
    pub sensitive: bool,
    /// May stay unset: templates then see null, JSON documents drop it.
    #[serde(default)]
    pub optional: bool,
}

impl ValueSpec {
    /// Checks the declaration itself (not a value).
    pub fn check(&self) -> Result<(), String> {
        if self.kind == Kind::Enum && self.choices.is_empty() {
            return Err("type enum needs `choices = [...]`".into());
        }
        match (self.kind, self.items) {
            (Kind::List, None) => return Err("type list needs `items = \"<type>\"`".into()),
            (Kind::List, Some(Kind::List)) => return Err("lists of lists are not supported".into()),
            (Kind::List, Some(Kind::Enum)) if self.choices.is_empty() => {
                return Err("a list of enum needs `choices = [...]`".into())
            }
            (k, Some(_)) if k != Kind::List => return Err("`items` is only for type list".into()),
            _ => {}
        }
        if let Some(p) = &self.pattern {
            regex::Regex::new(p).map_err(|e| format!("pattern does not compile: {e}"))?;
        }
        if self.sensitive && self.default.is_some() {
            return Err("a sensitive value cannot have a default".into());
        }
        if self.optional && self.default.is_some() {
            return Err("an optional value has no default (unset means null)".into());
        }
        Ok(())
    }

    /// Whether two layers declare the same contract (descriptions may differ).
    pub fn same_contract(&self, other: &ValueSpec) -> bool {
        self.kind == other.kind
            && self.default == other.default
            && self.choices == other.choices
            && self.items == other.items
            && self.min == other.min
            && self.max == other.max
            && self.pattern == other.pattern
            && self.sensitive == other.sensitive
            && self.optional == other.optional
    }

    /// Parses one item of a list value (e.g. a `when` test on a list).
    pub fn item_parse(&self, raw: &toml::Value) -> Result<Json, String> {
        self.item_spec().parse(&Raw::Toml(raw))
    }

    fn item_spec(&self) -> ValueSpec {
        ValueSpec {
            kind: self.items.unwrap_or(Kind::String),
            items: None,
            default: None,
            ..self.clone()
        }
    }

    /// Parses and validates one input into its typed, normalised form.
    pub fn parse(&self, raw: &Raw) -> Result<Json, String> {
        if self.optional && matches!(raw, Raw::Text("")) {
            return Ok(Json::Null);
        }
        match (self.kind, raw) {
            (Kind::List, Raw::Text(s)) => {
                let items: Vec<&str> = if s.trim().is_empty() {
                    Vec::new()
                } else {
                    s.split(',').map(str::trim).collect()
                };
                self.parse_list(items.into_iter().map(Raw::Text))
            }
            (Kind::List, Raw::Toml(toml::Value::Array(items))) => {
                self.parse_list(items.iter().map(Raw::Toml))
            }
            (Kind::List, Raw::Toml(_)) => Err("expected a list, e.g. [\"a\", \"b\"]".into()),
            (Kind::Bool, Raw::Text(s)) => match *s {
                "true" => Ok(Json::Bool(true)),
                "false" => Ok(Json::Bool(false)),
                _ => Err("expected true or false".into()),
            },
            (Kind::Bool, Raw::Toml(toml::Value::Boolean(b))) => Ok(Json::Bool(*b)),
            (Kind::Bool, Raw::Toml(_)) => Err("expected true or false".into()),
            (Kind::Int | Kind::Port, Raw::Toml(toml::Value::Integer(i))) => {
                self.parse_text(&i.to_string())
            }
            (_, Raw::Toml(toml::Value::String(s))) => self.parse_text(s),
            (_, Raw::Text(s)) => self.parse_text(s),
            (_, Raw::Toml(other)) => Err(format!(
                "expected {}, not a TOML {}",
                self.kind.hint(),
                other.type_str()
            )),
        }
    }

    fn parse_list<'a>(&self, items: impl Iterator<Item = Raw<'a>>) -> Result<Json, String> {
        let item = self.item_spec();
        let mut out = Vec::new();
        for (i, raw) in items.enumerate() {
            let v = item
                .parse(&raw)
                .map_err(|why| format!("item {}: {why}", i + 1))?;
            if out.contains(&v) {
                return Err(format!("lists {v} twice"));
            }
            out.push(v);
        }
        Ok(Json::Array(out))
    }

    fn parse_text(&self, s: &str) -> Result<Json, String> {
        let text = |r: Result<String, String>| r.map(Json::String);
        match self.kind {
            Kind::String => {
                names::check_plain_text(s)?;
                if let Some(p) = &self.pattern {
                    let re = regex::Regex::new(&format!("^(?:{p})$")).map_err(|e| e.to_string())?;
                    if !re.is_match(s) {
                        return Err(format!("does not match the pattern {p}"));
                    }
                }
                Ok(Json::String(s.to_string()))
            }
            Kind::Int => {
                let n: i64 = s
                    .parse()
                    .map_err(|_| "expected a whole number".to_string())?;
                if self.min.is_some_and(|m| n < m) || self.max.is_some_and(|m| n > m) {
                    return Err(format!(
                        "must be between {} and {}",
                        self.min.map_or("-".into(), |m| m.to_string()),
                        self.max.map_or("-".into(), |m| m.to_string())
                    ));
                }
                Ok(Json::from(n))
            }
            Kind::Port => names::port(s).map(Json::from),
            Kind::Hostname => text(names::dns_name(s)),
            Kind::ServerName => text(names::server_name(s)),
            Kind::Email => text(names::email(s)),
            Kind::Url => text(names::url(s)),
            Kind::Size => text(names::size(s)),
            Kind::Enum => {
                if self.choices.iter().any(|c| c == s) {
                    Ok(Json::String(s.to_string()))
                } else {
                    Err(format!(
                        "must be one of {}{}",
                        self.choices.join(", "),
                        did_you_mean(s, self.choices.iter().map(String::as_str))
                    ))
                }
            }
            Kind::Bool | Kind::List => unreachable!("handled in parse"),
        }
    }
}

/// One input as given: text from `--set`, or a TOML value from a file.
#[derive(Debug, Clone)]
pub enum Raw<'a> {
    Text(&'a str),
    Toml(&'a toml::Value),
}

/// Where a set of inputs came from, for error messages.
#[derive(Debug, Clone)]
pub struct Source {
    pub name: String,
    pub values: BTreeMap<String, OwnedRaw>,
}

#[derive(Debug, Clone)]
pub enum OwnedRaw {
    Text(String),
    Toml(toml::Value),
}

impl OwnedRaw {
    fn as_raw(&self) -> Raw<'_> {
        match self {
            OwnedRaw::Text(s) => Raw::Text(s),
            OwnedRaw::Toml(v) => Raw::Toml(v),
        }
    }
}

/// A resolved, validated value.
#[derive(Debug, Clone, PartialEq)]
pub struct Value {
    pub json: Json,
    pub sensitive: bool,
}

/// All resolved site values of a plan, by name.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Values(pub BTreeMap<String, Value>);

impl Values {
    pub fn get(&self, name: &str) -> Option<&Json> {
        self.0.get(name).map(|v| &v.json)
    }

    /// The values safe to record and print: everything not sensitive.
    pub fn public(&self) -> BTreeMap<String, Json> {
        self.0
            .iter()
            .filter(|(_, v)| !v.sensitive)
            .map(|(k, v)| (k.clone(), v.json.clone()))
            .collect()
    }
}

/// Parses `key=value` from `--set`.
pub fn parse_set(arg: &str) -> Result<(String, String), UsageError> {
    match arg.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() && k.trim() == k => Ok((k.to_string(), v.to_string())),
        _ => Err(UsageError(format!(
            "--set {arg:?} is malformed: write --set name=value, e.g. --set server_name=example.org"
        ))),
    }
}

/// Shows a value in an error, unless it is sensitive.
fn shown(spec: &ValueSpec, raw: &Raw) -> String {
    if spec.sensitive {
        return "(sensitive value not shown)".into();
    }
    match raw {
        Raw::Text(s) => format!("{s:?}"),
        Raw::Toml(v) => v.to_string(),
    }
}

/// Resolves every declared value from the sources (later ones win) and the
/// declared defaults. Reports unknown names, invalid values and missing
/// required values together.
pub fn resolve(
    specs: &BTreeMap<String, ValueSpec>,
    sources: &[Source],
) -> Result<Values, UsageError> {
    let mut problems = Vec::new();
    let mut given: BTreeMap<&str, (&Source, &OwnedRaw)> = BTreeMap::new();
    for source in sources {
        for (name, raw) in &source.values {
            if specs.contains_key(name) {
                given.insert(name, (source, raw));
            } else {
                let hint = did_you_mean(name, specs.keys().map(String::as_str));
                let hint = if hint.is_empty() {
                    format!(
                        "; known values: {}",
                        specs.keys().cloned().collect::<Vec<_>>().join(", ")
                    )
                } else {
                    hint
                };
                problems.push(format!(
                    "{}: unknown site value `{name}`{hint}",
                    source.name
                ));
            }
        }
    }

    let mut resolved = BTreeMap::new();
    for (name, (source, raw)) in &given {
        let spec = &specs[*name];
        match spec.parse(&raw.as_raw()) {
            Ok(json) => {
                resolved.insert(
                    name.to_string(),
                    Value {
                        json,
                        sensitive: spec.sensitive,
                    },
                );
            }
            Err(why) => {
                // Enums and lists already say what they accept.
                let expected = match spec.kind {
                    Kind::Enum | Kind::List => String::new(),
                    Kind::String if spec.pattern.is_some() => String::new(),
                    kind => format!("; expected {}", kind.hint()),
                };
                problems.push(format!(
                    "{}: {name} = {} is invalid: {why}{expected}",
                    source.name,
                    shown(spec, &raw.as_raw()),
                ))
            }
        }
    }

    let mut missing = Vec::new();
    for name in specs.keys() {
        if given.contains_key(name.as_str()) {
            continue;
        }
        let mut visiting = BTreeSet::new();
        match default_of(name, specs, &given, &mut resolved, &mut visiting) {
            Ok(true) => {}
            Ok(false) => missing.push(name.clone()),
            Err(why) => problems.push(why),
        }
    }
    if !missing.is_empty() {
        let missing: Vec<(String, String)> =
            missing.into_iter().map(|n| (n, String::new())).collect();
        problems.push(missing_required(specs, &missing));
    }
    if problems.is_empty() {
        Ok(Values(resolved))
    } else {
        Err(UsageError(problems.join("\n")))
    }
}

/// The error for required values nobody gave: each (name, why it is needed)
/// with its description and type; `why` may be empty.
pub fn missing_required(
    specs: &BTreeMap<String, ValueSpec>,
    missing: &[(String, String)],
) -> String {
    let lines: Vec<String> = missing
        .iter()
        .map(|(n, why)| {
            let why = if why.is_empty() {
                String::new()
            } else {
                format!("; {why}")
            };
            format!(
                "  {n}: {} ({}){why}",
                specs[n].description,
                specs[n].kind.hint()
            )
        })
        .collect();
    format!(
        "missing required site values; give each with --set name=value or in --site FILE:\n{}",
        lines.join("\n")
    )
}

/// Fills `name` from its default, first resolving the values the default
/// refers to. Returns false when there is no default (a required value).
fn default_of(
    name: &str,
    specs: &BTreeMap<String, ValueSpec>,
    given: &BTreeMap<&str, (&Source, &OwnedRaw)>,
    resolved: &mut BTreeMap<String, Value>,
    visiting: &mut BTreeSet<String>,
) -> Result<bool, String> {
    if resolved.contains_key(name) {
        return Ok(true);
    }
    if given.contains_key(name) {
        // Given but invalid: already reported.
        return Ok(false);
    }
    let spec = &specs[name];
    let Some(default) = &spec.default else {
        if spec.optional {
            resolved.insert(
                name.to_string(),
                Value {
                    json: Json::Null,
                    sensitive: spec.sensitive,
                },
            );
            return Ok(true);
        }
        return Ok(false);
    };
    if !visiting.insert(name.to_string()) {
        return Err(format!(
            "the default of {name} refers back to itself through ${{...}}"
        ));
    }
    let default = match default {
        toml::Value::String(template) => {
            let mut text = String::new();
            let mut rest = template.as_str();
            while let Some(start) = rest.find("${") {
                text.push_str(&rest[..start]);
                let end = rest[start..]
                    .find('}')
                    .ok_or_else(|| format!("the default of {name} has an unclosed ${{"))?;
                let reference = &rest[start + 2..start + end];
                if !specs.contains_key(reference) {
                    return Err(format!("the default of {name} refers to ${{{reference}}}, which is not a declared value"));
                }
                if !default_of(reference, specs, given, resolved, visiting)? {
                    if given.contains_key(reference) {
                        return Ok(true); // the referenced value is invalid, already reported
                    }
                    return Ok(false);
                }
                match &resolved[reference].json {
                    Json::Null => {
                        return Err(format!(
                            "the default of {name} refers to ${{{reference}}}, which is unset"
                        ))
                    }
                    Json::String(s) => text.push_str(s),
                    Json::Number(n) => text.push_str(&n.to_string()),
                    Json::Bool(b) => text.push_str(&b.to_string()),
                    _ => {
                        return Err(format!(
                            "the default of {name} refers to the list {reference}"
                        ))
                    }
                }
                rest = &rest[start + end + 1..];
            }
            text.push_str(rest);
            toml::Value::String(text)
        }
        other => other.clone(),
    };
    visiting.remove(name);
    let json = spec.parse(&Raw::Toml(&default)).map_err(|why| {
        format!(
            "{name}: its default {} is invalid: {why}; set {name} explicitly (--set {name}=...)",
            default
        )
    })?;
    resolved.insert(
        name.to_string(),
        Value {
            json,
            sensitive: spec.sensitive,
        },
    );
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(toml_text: &str) -> BTreeMap<String, ValueSpec> {
        toml::from_str(toml_text).unwrap()
    }

    const SPECS: &str = r#"
        [server_name]
        type = "server_name"
        default = "example.org"
        description = "d"
        [matrix_host]
        type = "hostname"
        default = "matrix.${server_name}"
        description = "d"
        [proxy]
        type = "enum"
        choices = ["nginx", "caddy", "traefik"]
        default = "nginx"
        description = "d"
        [bridges]
        type = "list"
        items = "enum"
        choices = ["whatsapp", "telegram", "signal"]
        default = []
        description = "d"
        [federation]
        type = "bool"
        default = true
        description = "d"
        [acme_email]
        type = "email"
        description = "d"
    "#;

    fn set(pairs: &[(&str, &str)]) -> Source {
        Source {
            name: "--set".into(),
            values: pairs
                .iter()
                .map(|(k, v)| (k.to_string(), OwnedRaw::Text(v.to_string())))
                .collect(),
        }
    }

    #[test]
    fn defaults_interpolate_and_sets_win() {
        let s = specs(SPECS);
        let v = resolve(
            &s,
            &[set(&[
                ("server_name", "Chat.Example.net"),
                ("acme_email", "a@b.org"),
                ("bridges", "telegram, signal"),
            ])],
        )
        .unwrap();
        assert_eq!(v.get("server_name").unwrap(), "chat.example.net");
        assert_eq!(v.get("matrix_host").unwrap(), "matrix.chat.example.net");
        assert_eq!(
            v.get("bridges").unwrap(),
            &serde_json::json!(["telegram", "signal"])
        );
        assert_eq!(v.get("federation").unwrap(), &Json::Bool(true));
    }

    #[test]
    fn problems_are_reported_together() {
        let s = specs(SPECS);
        let err = resolve(
            &s,
            &[set(&[
                ("sever_name", "x.org"),
                ("proxy", "ngnix"),
                ("bridges", "telegram,irc"),
            ])],
        )
        .unwrap_err()
        .0;
        assert!(
            err.contains("unknown site value `sever_name`; did you mean `server_name`?"),
            "{err}"
        );
        assert!(err.contains("proxy = \"ngnix\" is invalid: must be one of nginx, caddy, traefik; did you mean `nginx`?"), "{err}");
        assert!(
            err.contains("bridges = \"telegram,irc\" is invalid: item 2"),
            "{err}"
        );
        assert!(
            err.contains("missing required site values") && err.contains("acme_email"),
            "{err}"
        );
    }

    #[test]
    fn injection_through_server_name_is_refused_and_named() {
        let s = specs(SPECS);
        for evil in [
            "example.org\nlocation /x { return 200 pwned; }",
            "example.org\nenable_registration: true",
        ] {
            let err = resolve(
                &s,
                &[set(&[("server_name", evil), ("acme_email", "a@b.org")])],
            )
            .unwrap_err()
            .0;
            assert!(err.contains("server_name = "), "{err}");
            assert!(err.contains("control character"), "{err}");
        }
    }

    #[test]
    fn a_default_that_becomes_invalid_says_what_to_set() {
        let s = specs(SPECS);
        let err = resolve(
            &s,
            &[set(&[
                ("server_name", "example.org:8448"),
                ("acme_email", "a@b.org"),
            ])],
        )
        .unwrap_err()
        .0;
        assert!(
            err.contains("matrix_host: its default \"matrix.example.org:8448\" is invalid"),
            "{err}"
        );
        assert!(err.contains("--set matrix_host="), "{err}");
    }

    #[test]
    fn sensitive_values_are_never_shown() {
        let s = specs(
            r#"
            [api_hash]
            type = "string"
            pattern = "[0-9a-f]{32}"
            sensitive = true
            description = "d"
        "#,
        );
        let err = resolve(&s, &[set(&[("api_hash", "topsecretvalue")])])
            .unwrap_err()
            .0;
        assert!(!err.contains("topsecretvalue"), "{err}");
        let ok = resolve(&s, &[set(&[("api_hash", &"a".repeat(32))])]).unwrap();
        assert!(ok.public().is_empty());
    }

    #[test]
    fn toml_types_are_checked() {
        let s = specs(SPECS);
        let src = Source {
            name: "site.toml".into(),
            values: [
                (
                    "federation".to_string(),
                    OwnedRaw::Toml(toml::Value::String("yes".into())),
                ),
                (
                    "acme_email".to_string(),
                    OwnedRaw::Toml(toml::Value::Integer(3)),
                ),
            ]
            .into(),
        };
        let err = resolve(&s, &[src]).unwrap_err().0;
        assert!(
            err.contains("site.toml: federation = \"yes\" is invalid: expected true or false"),
            "{err}"
        );
        assert!(
            err.contains("site.toml: acme_email = 3 is invalid"),
            "{err}"
        );
    }

    #[test]
    fn optional_values_default_to_null_and_empty_unsets() {
        let s = specs(
            r#"
            [identity_server]
            type = "url"
            optional = true
            description = "d"
        "#,
        );
        assert_eq!(
            resolve(&s, &[set(&[])]).unwrap().get("identity_server"),
            Some(&Json::Null)
        );
        assert_eq!(
            resolve(&s, &[set(&[("identity_server", "")])])
                .unwrap()
                .get("identity_server"),
            Some(&Json::Null)
        );
        assert_eq!(
            resolve(&s, &[set(&[("identity_server", "https://vector.im")])])
                .unwrap()
                .get("identity_server")
                .unwrap(),
            "https://vector.im"
        );
        assert!(resolve(&s, &[set(&[("identity_server", "vector.im")])]).is_err());
    }

    #[test]
    fn malformed_set() {
        assert!(parse_set("server_name").is_err());
        assert!(parse_set("=x").is_err());
        assert_eq!(parse_set("a=b=c").unwrap(), ("a".into(), "b=c".into()));
    }
}
