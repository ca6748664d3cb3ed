//! Renders `*.tera` files with a layer's declared site values, and refuses a
//! template that uses a value the layer does not declare — in any branch,
//! not only the one taken with today's values.
//!
//! Values reach config files through quoting filters: `yaml`, `json` and
//! `toml` (a JSON-encoded scalar or flow list is valid in all three for the
//! values site values can hold) and `shell` (a single-quoted word).
//! `regex_escape` makes a value match itself literally inside a regular
//! expression (e.g. a server name in an appservice namespace); it does not
//! quote, so its result still goes through one of the quoting filters.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use anyhow::{anyhow, Result};
use serde_json::Value as Json;
use tera::ast::{Expr, ExprVal, Node};
use tera::{Context, Tera};

/// Renders one template. `name` is the path shown in errors.
pub fn render(name: &str, source: &str, values: &BTreeMap<String, Json>) -> Result<String> {
    let mut tera = Tera::default();
    tera.autoescape_on(vec![]);
    for filter in ["yaml", "json", "toml"] {
        tera.register_filter(filter, encode_json);
    }
    tera.register_filter("shell", shell_quote);
    tera.register_filter("regex_escape", regex_escape);
    tera.add_raw_template(name, source)
        .map_err(|e| syntax_error(name, &e))?;

    let template = tera
        .get_template(name)
        .map_err(|e| anyhow!("{name}: {e}"))?;
    let mut used = BTreeSet::new();
    let mut bound = BTreeSet::new();
    walk_nodes(&template.ast, &mut used, &mut bound);
    for m in template.macros.values() {
        bound.extend(m.args.keys().cloned());
        walk_nodes(&m.body, &mut used, &mut bound);
    }
    for var in used.difference(&bound) {
        if var == "loop" || var == "__tera_context" || values.contains_key(var) {
            continue;
        }
        let line = source
            .lines()
            .position(|l| contains_word(l, var))
            .map_or(String::new(), |i| format!(":{}", i + 1));
        return Err(anyhow!(
            "{name}{line}: the template uses `{var}`, which its layer does not declare; \
             add [values.{var}] to the layer's layer.toml or fix the name"
        ));
    }

    let mut context = Context::new();
    for (k, v) in values {
        context.insert(k, v);
    }
    tera.render(name, &context).map_err(|e| {
        let chain: Vec<String> =
            std::iter::successors(Some(&e as &dyn std::error::Error), |e| e.source())
                .map(|e| e.to_string())
                .collect();
        // A template's `throw(message=...)` rejects a combination of site
        // values: a usage error, in its own words.
        if let Some(why) = chain
            .iter()
            .position(|c| c == "Function call 'throw' failed")
            .and_then(|i| chain.get(i + 1))
        {
            return crate::error::usage(format!("site values: {why} (checked by {name})"));
        }
        anyhow!("{name}: rendering failed: {}", chain.join(": "))
    })
}

/// "file:line:col: template syntax error" from Tera's parse error.
fn syntax_error(name: &str, err: &tera::Error) -> anyhow::Error {
    let detail: Vec<String> =
        std::iter::successors(Some(err as &dyn std::error::Error), |e| e.source())
            .map(|e| e.to_string())
            .collect();
    let detail = detail.join("\n");
    let position = detail
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("--> "))
        .map_or(String::new(), |p| format!(":{}", p.trim()));
    anyhow!("{name}{position}: template syntax error\n{detail}")
}

fn contains_word(line: &str, word: &str) -> bool {
    line.match_indices(word).any(|(i, _)| {
        let before = line[..i].chars().next_back();
        let after = line[i + word.len()..].chars().next();
        let ident = |c: Option<char>| c.is_some_and(|c| c.is_alphanumeric() || c == '_');
        !ident(before) && !ident(after)
    })
}

fn walk_nodes(nodes: &[Node], used: &mut BTreeSet<String>, bound: &mut BTreeSet<String>) {
    for node in nodes {
        match node {
            Node::VariableBlock(_, e) => walk_expr(e, used, bound),
            Node::Set(_, set) => {
                bound.insert(set.key.clone());
                walk_expr(&set.value, used, bound);
            }
            Node::FilterSection(_, section, _) => {
                walk_args(&section.filter.args, used, bound);
                walk_nodes(&section.body, used, bound);
            }
            Node::Block(_, block, _) => walk_nodes(&block.body, used, bound),
            Node::Forloop(_, f, _) => {
                bound.insert(f.value.clone());
                if let Some(k) = &f.key {
                    bound.insert(k.clone());
                }
                walk_expr(&f.container, used, bound);
                walk_nodes(&f.body, used, bound);
                if let Some(body) = &f.empty_body {
                    walk_nodes(body, used, bound);
                }
            }
            Node::If(cond, _) => {
                for (_, e, body) in &cond.conditions {
                    walk_expr(e, used, bound);
                    walk_nodes(body, used, bound);
                }
                if let Some((_, body)) = &cond.otherwise {
                    walk_nodes(body, used, bound);
                }
            }
            Node::MacroDefinition(_, m, _) => {
                bound.extend(m.args.keys().cloned());
                walk_nodes(&m.body, used, bound);
            }
            Node::Super
            | Node::Text(_)
            | Node::Extends(..)
            | Node::Include(..)
            | Node::ImportMacro(..)
            | Node::Raw(..)
            | Node::Break(_)
            | Node::Continue(_)
            | Node::Comment(..) => {}
        }
    }
}

fn walk_args(
    args: &HashMap<String, Expr>,
    used: &mut BTreeSet<String>,
    bound: &mut BTreeSet<String>,
) {
    for e in args.values() {
        walk_expr(e, used, bound);
    }
}

fn walk_expr(expr: &Expr, used: &mut BTreeSet<String>, bound: &mut BTreeSet<String>) {
    for f in &expr.filters {
        walk_args(&f.args, used, bound);
    }
    walk_val(&expr.val, used, bound);
}

fn walk_val(val: &ExprVal, used: &mut BTreeSet<String>, bound: &mut BTreeSet<String>) {
    let root = |ident: &str| ident.split(['.', '[']).next().unwrap_or(ident).to_string();
    match val {
        ExprVal::Ident(ident) => {
            used.insert(root(ident));
        }
        ExprVal::Math(m) => {
            walk_expr(&m.lhs, used, bound);
            walk_expr(&m.rhs, used, bound);
        }
        ExprVal::Logic(l) => {
            walk_expr(&l.lhs, used, bound);
            walk_expr(&l.rhs, used, bound);
        }
        ExprVal::Test(t) => {
            used.insert(root(&t.ident));
            for a in &t.args {
                walk_expr(a, used, bound);
            }
        }
        ExprVal::MacroCall(m) => walk_args(&m.args, used, bound),
        ExprVal::FunctionCall(f) => walk_args(&f.args, used, bound),
        ExprVal::Array(items) => {
            for e in items {
                walk_expr(e, used, bound);
            }
        }
        ExprVal::StringConcat(c) => {
            for v in &c.values {
                walk_val(v, used, bound);
            }
        }
        ExprVal::In(i) => {
            walk_expr(&i.lhs, used, bound);
            walk_expr(&i.rhs, used, bound);
        }
        ExprVal::String(_) | ExprVal::Int(_) | ExprVal::Float(_) | ExprVal::Bool(_) => {}
    }
}

fn encode_json(value: &Json, _: &HashMap<String, Json>) -> tera::Result<Json> {
    serde_json::to_string(value)
        .map(Json::String)
        .map_err(|e| tera::Error::msg(format!("cannot encode value: {e}")))
}

fn shell_quote(value: &Json, _: &HashMap<String, Json>) -> tera::Result<Json> {
    let text = match value {
        Json::String(s) => s.clone(),
        Json::Number(_) | Json::Bool(_) => value.to_string(),
        _ => {
            return Err(tera::Error::msg(
                "the shell filter quotes a single value, not a list",
            ))
        }
    };
    Ok(Json::String(format!("'{}'", text.replace('\'', r"'\''"))))
}

fn regex_escape(value: &Json, _: &HashMap<String, Json>) -> tera::Result<Json> {
    match value {
        Json::String(s) => Ok(Json::String(regex::escape(s))),
        _ => Err(tera::Error::msg("regex_escape takes a string")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn values(pairs: &[(&str, Json)]) -> BTreeMap<String, Json> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect()
    }

    #[test]
    fn filters_quote() {
        let v = values(&[
            ("name", json!("a: b\n\"c\"")),
            ("list", json!(["x", "y"])),
            ("n", json!(8448)),
        ]);
        let out = render(
            "t",
            "k: {{ name | yaml }}\nl: {{ list | yaml }}\np: {{ n | json }}\ns={{ name | shell }}",
            &v,
        )
        .unwrap();
        assert_eq!(
            out,
            "k: \"a: b\\n\\\"c\\\"\"\nl: [\"x\",\"y\"]\np: 8448\ns='a: b\n\"c\"'"
        );
        let parsed: serde_yaml::Value =
            serde_yaml::from_str(out.split("\ns=").next().unwrap()).unwrap();
        assert_eq!(parsed["k"], serde_yaml::Value::from("a: b\n\"c\""));
        let q = render("t", "{{ s | shell }}", &values(&[("s", json!("it's"))])).unwrap();
        assert_eq!(q, r"'it'\''s'");
    }

    #[test]
    fn regex_escape_makes_a_name_literal() {
        let v = values(&[("server_name", json!("ex-ample.org:8448"))]);
        let out = render(
            "t",
            "{% set d = server_name | regex_escape %}{{ \"^@bot:\" ~ d ~ \"$\" | yaml }}",
            &v,
        )
        .unwrap();
        assert_eq!(out, r#""^@bot:ex\\-ample\\.org:8448$""#);
        let pattern: String = serde_yaml::from_str(&out).unwrap();
        let re = regex::Regex::new(&pattern).unwrap();
        assert!(re.is_match("@bot:ex-ample.org:8448"));
        assert!(!re.is_match("@bot:exx-ample.org:8448") && !re.is_match("@bot:ex-ampleXorg:8448"));
    }

    #[test]
    fn html_like_names_are_not_escaped() {
        let out = render("index.html", "{{ u }}", &values(&[("u", json!("a&b"))])).unwrap();
        assert_eq!(out, "a&b");
    }

    #[test]
    fn undeclared_values_are_refused_even_in_untaken_branches() {
        let v = values(&[("on", json!(false))]);
        let err = render(
            "x.yaml.tera",
            "a: 1\n{% if on %}\nb: {{ secret_thing | yaml }}\n{% endif %}\n",
            &v,
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.starts_with("x.yaml.tera:3: the template uses `secret_thing`"),
            "{msg}"
        );
    }

    #[test]
    fn loop_and_set_variables_are_local() {
        let v = values(&[("items", json!(["a", "b"]))]);
        let out = render(
            "t",
            "{% set sep = \",\" %}{% for i in items %}{{ i }}{{ sep }}{{ loop.index }}{% endfor %}",
            &v,
        )
        .unwrap();
        assert_eq!(out, "a,1b,2");
    }

    #[test]
    fn syntax_errors_name_file_and_line() {
        let err = render(
            "layers/x/root/a.conf.tera",
            "ok\nok\n{{ broken ~ }}\n",
            &BTreeMap::new(),
        )
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(msg.starts_with("layers/x/root/a.conf.tera:3:"), "{msg}");
        assert!(msg.contains("template syntax error"), "{msg}");
    }
}
