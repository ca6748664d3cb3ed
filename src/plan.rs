//! Planning: a profile plus site values become an ordered list of layers
//! and a validated set of values, or a list of everything wrong with them.
//! Nothing is rendered or written here.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::fs;
use std::path::PathBuf;

use anyhow::{anyhow, Result};
use serde_json::Value as Json;

use crate::error::{did_you_mean, usage};
use crate::images::{self, ImageDecl, PlannedImage};
use crate::kind;
use crate::layer::Layer;
use crate::profile::Profile;
use crate::project::Project;
use crate::values::{self, OwnedRaw, Raw, Source, ValueSpec, Values};

/// What the user gave besides the profile name.
#[derive(Debug, Clone, Default)]
pub struct SiteInput {
    pub site_file: Option<PathBuf>,
    /// `name=value` as given to `--set`.
    pub sets: Vec<String>,
    /// `--output`: build only these of the profile's outputs (all if empty).
    pub outputs: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Plan {
    pub profile: Profile,
    /// The included layers, dependencies first.
    pub layers: Vec<Layer>,
    pub values: Values,
    /// The container images the layers need, by name, with their sources.
    pub images: Vec<PlannedImage>,
    /// Layers that an output kind adds (`images/<kind>.toml` `layers`), with
    /// that kind: they go into its artifact only, never into the bundle.
    pub kind_layers: BTreeMap<String, String>,
}

impl Plan {
    /// The values one layer reads, for rendering and its cache key.
    /// Besides its declared values, a layer that declares or uses images
    /// sees `images.<name>` (see `PlannedImage::template_info`).
    pub fn values_for(&self, layer: &Layer) -> BTreeMap<String, Json> {
        let mut values: BTreeMap<String, Json> = layer
            .def
            .values
            .keys()
            .filter_map(|k| self.values.get(k).map(|v| (k.clone(), v.clone())))
            .collect();
        let images: serde_json::Map<String, Json> = self
            .images
            .iter()
            .filter(|i| i.users.contains(&layer.name))
            .map(|i| (i.name.clone(), i.template_info()))
            .collect();
        if !images.is_empty() {
            values.insert("images".into(), Json::Object(images));
        }
        values
    }

    /// The non-sensitive values the included layers read: what the
    /// manifest records.
    pub fn used_public_values(&self) -> BTreeMap<String, Json> {
        let read: BTreeSet<&String> = self
            .layers
            .iter()
            .flat_map(|l| l.def.values.keys())
            .collect();
        self.values
            .public()
            .into_iter()
            .filter(|(k, _)| read.contains(k))
            .collect()
    }
}

pub fn plan(project: &Project, profile_name: &str, input: &SiteInput) -> Result<Plan> {
    let mut profile = Profile::load(project, profile_name)?;
    // Every output's layers declare values (a site file for the whole profile
    // stays valid with --output); only the selected outputs' layers are built.
    let all_outputs = profile.outputs.clone();
    if !input.outputs.is_empty() {
        for output in &input.outputs {
            if !profile.outputs.contains(output) {
                return Err(usage(format!(
                    "--output {output}: profile {} makes {}; choose among them",
                    profile.name,
                    profile.outputs.join(", ")
                )));
            }
        }
        profile.outputs.retain(|o| input.outputs.contains(o));
    }
    let known_layers = project.layer_names()?;
    let mut candidates = Vec::new();
    for name in &profile.layers {
        if !known_layers.contains(name) {
            return Err(anyhow!(
                "profile {} lists layer {name:?}, which does not exist in {}{}; known layers: {}",
                profile.name,
                project.layers_dir().display(),
                did_you_mean(name, known_layers.iter().map(String::as_str)),
                known_layers.join(", ")
            ));
        }
        candidates.push(Layer::load(&project.layers_dir(), name)?);
    }
    let mut kind_layers = BTreeMap::new();
    for output in &all_outputs {
        for name in kind::load(project, output)?.layers {
            if !known_layers.contains(&name) {
                return Err(anyhow!(
                    "images/{output}.toml adds layer {name:?}, which does not exist in {}",
                    project.layers_dir().display()
                ));
            }
            if profile.layers.contains(&name) || kind_layers.contains_key(&name) {
                return Err(anyhow!(
                    "layer {name:?} is added by images/{output}.toml and must not also be listed \
                     by profile {} or another output",
                    profile.name
                ));
            }
            candidates.push(Layer::load(&project.layers_dir(), &name)?);
            kind_layers.insert(name, output.clone());
        }
    }

    let decls = images::collect_decls(&candidates)?;
    let specs = collect_specs(&candidates, &decls)?;
    check_when_clauses(&candidates, &decls, &specs)?;
    let sources = sources(&profile, input)?;
    // A required value that only conditional layers declare is required only
    // when one of them is included: it resolves as optional here, and the
    // included layers' needs are checked below.
    let conditional = conditionally_required(&candidates, &specs);
    let mut lenient = specs.clone();
    for name in &conditional {
        if let Some(spec) = lenient.get_mut(name) {
            spec.optional = true;
        }
    }
    let values = values::resolve(&lenient, &sources)?;

    kind_layers.retain(|_, kind| profile.outputs.contains(kind));
    let layers: Vec<Layer> = candidates
        .into_iter()
        .filter(|l| when_holds(&l.def.when, &specs, &values))
        .filter(|l| profile.layers.contains(&l.name) || kind_layers.contains_key(&l.name))
        .map(|mut l| {
            // JSON documents whose `json_when` does not hold are not made.
            let when = &l.def.json_when;
            l.def.json.retain(|path, _| {
                when.get(path)
                    .is_none_or(|w| when_holds(w, &specs, &values))
            });
            l
        })
        .collect();
    let layers = order(layers, project)?;
    check_conditionally_required(&layers, &conditional, &specs, &values)?;

    let mut needed: BTreeMap<String, (ImageDecl, Vec<String>)> = BTreeMap::new();
    for layer in &layers {
        for name in images::layer_images(layer, &|d| when_holds(&d.when, &specs, &values)) {
            let (_, decl) = &decls[name];
            if when_holds(&decl.when, &specs, &values) {
                needed
                    .entry(name.to_string())
                    .or_insert_with(|| (decl.clone(), Vec::new()))
                    .1
                    .push(layer.name.clone());
            }
        }
    }
    let images = images::plan_images(project, &needed, &values)?;
    Ok(Plan {
        profile,
        layers,
        values,
        images,
        kind_layers,
    })
}

/// Required values (no default, not optional) that only layers with a `when`
/// clause declare.
fn conditionally_required(
    layers: &[Layer],
    specs: &BTreeMap<String, ValueSpec>,
) -> BTreeSet<String> {
    specs
        .iter()
        .filter(|(_, spec)| spec.default.is_none() && !spec.optional)
        .filter(|(name, _)| {
            let mut declaring = layers.iter().filter(|l| l.def.values.contains_key(*name));
            declaring.all(|l| !l.def.when.is_empty())
        })
        .map(|(name, _)| name.clone())
        .collect()
}

/// The conditionally required values the included layers need and nobody gave.
fn check_conditionally_required(
    layers: &[Layer],
    conditional: &BTreeSet<String>,
    specs: &BTreeMap<String, ValueSpec>,
    values: &Values,
) -> Result<()> {
    let mut missing = Vec::new();
    for name in conditional {
        if values.get(name).is_some_and(|v| !v.is_null()) {
            continue;
        }
        let needing: Vec<String> = layers
            .iter()
            .filter(|l| l.def.values.contains_key(name))
            .map(|l| {
                let when: Vec<String> = l
                    .def
                    .when
                    .iter()
                    .map(|(k, v)| format!("{k} = {v}"))
                    .collect();
                format!("layer {} needs it ({})", l.name, when.join(", "))
            })
            .collect();
        if !needing.is_empty() {
            missing.push((name.clone(), needing.join("; ")));
        }
    }
    if missing.is_empty() {
        Ok(())
    } else {
        Err(usage(values::missing_required(specs, &missing)))
    }
}

/// Every value any candidate layer declares, and those its images bring;
/// two declarations of one name must agree.
fn collect_specs(
    layers: &[Layer],
    decls: &BTreeMap<String, (String, ImageDecl)>,
) -> Result<BTreeMap<String, ValueSpec>> {
    let mut specs: BTreeMap<String, (String, ValueSpec)> = BTreeMap::new();
    let declared = layers
        .iter()
        .map(|l| (l.name.clone(), l.def.values.clone()));
    let implied = decls.iter().map(|(image, (layer, decl))| {
        (
            layer.clone(),
            images::implicit_specs(image, decl).into_iter().collect(),
        )
    });
    let all: Vec<(String, BTreeMap<String, ValueSpec>)> = declared.chain(implied).collect();
    for (layer_name, values) in &all {
        for (name, spec) in values {
            match specs.get(name) {
                Some((first, existing)) if !existing.same_contract(spec) => {
                    return Err(anyhow!(
                    "site value {name} is declared differently in layers/{first}/layer.toml and \
                         layers/{layer_name}/layer.toml (an image's [images] entry brings \
                         offline, <image>_image and <image>_image_source); make type, default and \
                         choices identical"
                ))
                }
                Some(_) => {}
                None => {
                    specs.insert(name.clone(), (layer_name.clone(), spec.clone()));
                }
            }
        }
    }
    Ok(specs.into_iter().map(|(k, (_, s))| (k, s)).collect())
}

fn check_when_clauses(
    layers: &[Layer],
    decls: &BTreeMap<String, (String, ImageDecl)>,
    specs: &BTreeMap<String, ValueSpec>,
) -> Result<()> {
    let layer_whens = layers
        .iter()
        .map(|l| (format!("layers/{}/layer.toml", l.name), &l.def.when));
    let image_whens = decls.iter().map(|(image, (layer, decl))| {
        (
            format!("layers/{layer}/layer.toml: [images.{image}]"),
            &decl.when,
        )
    });
    for (file, when) in layer_whens.chain(image_whens) {
        for (name, wanted) in when {
            let spec = specs.get(name).ok_or_else(|| {
                anyhow!("{file}: [when] tests {name:?}, which no layer of the profile declares")
            })?;
            let probe = match spec.kind {
                values::Kind::List => {
                    spec.parse(&Raw::Toml(&toml::Value::Array(vec![wanted.clone()])))
                }
                _ => spec.parse(&Raw::Toml(wanted)),
            };
            probe.map_err(|why| anyhow!("{file}: [when] {name} = {wanted}: {why}"))?;
        }
    }
    Ok(())
}

/// Profile values (parent first), then the site file, then `--set`.
fn sources(profile: &Profile, input: &SiteInput) -> Result<Vec<Source>> {
    let mut by_file: BTreeMap<&str, BTreeMap<String, OwnedRaw>> = BTreeMap::new();
    for (name, (file, value)) in &profile.values {
        by_file
            .entry(file)
            .or_default()
            .insert(name.clone(), OwnedRaw::Toml(value.clone()));
    }
    let mut sources: Vec<Source> = by_file
        .into_iter()
        .map(|(file, values)| Source {
            name: file.to_string(),
            values,
        })
        .collect();

    if let Some(path) = &input.site_file {
        let text = fs::read_to_string(path)
            .map_err(|e| usage(format!("cannot read site file {}: {e}", path.display())))?;
        let table: toml::Table = toml::from_str(&text)
            .map_err(|e| usage(format!("{}: {}", path.display(), e.to_string().trim_end())))?;
        sources.push(Source {
            name: path.display().to_string(),
            values: table
                .into_iter()
                .map(|(k, v)| (k, OwnedRaw::Toml(v)))
                .collect(),
        });
    }

    let mut sets = BTreeMap::new();
    for arg in &input.sets {
        let (k, v) = values::parse_set(arg)?;
        sets.insert(k, OwnedRaw::Text(v));
    }
    sources.push(Source {
        name: "--set".into(),
        values: sets,
    });
    Ok(sources)
}

/// Whether every clause of a `when` table holds for the values.
fn when_holds(
    when: &BTreeMap<String, toml::Value>,
    specs: &BTreeMap<String, ValueSpec>,
    values: &Values,
) -> bool {
    when.iter().all(|(name, wanted)| {
        let spec = &specs[name];
        let wanted = match spec.kind {
            values::Kind::List => spec.item_parse(wanted),
            _ => spec.parse(&Raw::Toml(wanted)),
        };
        match (values.get(name), wanted) {
            (Some(Json::Array(items)), Ok(w)) => items.contains(&w),
            (Some(v), Ok(w)) => *v == w,
            _ => false,
        }
    })
}

/// Checks provides/conflicts/requires and orders the layers so that every
/// layer comes after what it requires, otherwise keeping profile order.
fn order(layers: Vec<Layer>, project: &Project) -> Result<Vec<Layer>> {
    let mut provider: BTreeMap<&str, &str> = BTreeMap::new();
    for layer in &layers {
        for cap in layer.provides() {
            if let Some(other) = provider
                .insert(cap, &layer.name)
                .filter(|o| *o != layer.name)
            {
                return Err(usage(format!(
                    "layers {other} and {} both provide {cap:?}; a profile may hold only one of them \
                     (choose with a site value or remove one from the profile)",
                    layer.name
                )));
            }
        }
    }
    for layer in &layers {
        for c in &layer.def.conflicts {
            if let Some(other) = provider.get(c.as_str()).filter(|o| **o != layer.name) {
                return Err(usage(format!(
                    "layer {} conflicts with {c:?}, which layer {other} provides; remove one of them",
                    layer.name
                )));
            }
        }
        for r in &layer.def.requires {
            if !provider.contains_key(r.as_str()) {
                return Err(anyhow!(
                    "layer {} requires {r:?}, which no layer of this profile provides{}",
                    layer.name,
                    suggest_provider(project, r)
                ));
            }
        }
    }

    let index: BTreeMap<&str, usize> = layers
        .iter()
        .enumerate()
        .map(|(i, l)| (l.name.as_str(), i))
        .collect();
    let deps: Vec<BTreeSet<usize>> = layers
        .iter()
        .map(|l| {
            l.def
                .requires
                .iter()
                .map(|r| index[provider[r.as_str()]])
                .collect()
        })
        .collect();
    let mut waiting: Vec<usize> = deps.iter().map(BTreeSet::len).collect();
    let mut ready: BinaryHeap<Reverse<usize>> = (0..layers.len())
        .filter(|i| waiting[*i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::new();
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for (j, d) in deps.iter().enumerate() {
            if d.contains(&i) {
                waiting[j] -= 1;
                if waiting[j] == 0 {
                    ready.push(Reverse(j));
                }
            }
        }
    }
    if order.len() < layers.len() {
        return Err(anyhow!(
            "layers require each other in a cycle: {}",
            describe_cycle(&layers, &deps, &waiting)
        ));
    }
    let mut slots: Vec<Option<Layer>> = layers.into_iter().map(Some).collect();
    Ok(order
        .into_iter()
        .map(|i| slots[i].take().expect("each index once"))
        .collect())
}

/// Follows unresolved requirements from a stuck layer until one repeats.
fn describe_cycle(layers: &[Layer], deps: &[BTreeSet<usize>], waiting: &[usize]) -> String {
    let start = waiting.iter().position(|w| *w > 0).expect("a stuck layer");
    let mut path = vec![start];
    let mut current = start;
    loop {
        let next = *deps[current]
            .iter()
            .find(|d| waiting[**d] > 0)
            .expect("stuck layers wait on stuck layers");
        if let Some(pos) = path.iter().position(|p| *p == next) {
            let names: Vec<&str> = path[pos..]
                .iter()
                .chain([&next])
                .map(|i| layers[*i].name.as_str())
                .collect();
            return names.join(" → ");
        }
        path.push(next);
        current = next;
    }
}

fn suggest_provider(project: &Project, capability: &str) -> String {
    let Ok(names) = project.layer_names() else {
        return String::new();
    };
    let providers: Vec<String> = names
        .iter()
        .filter_map(|n| Layer::load(&project.layers_dir(), n).ok())
        .filter(|l| l.provides().any(|c| c == capability))
        .map(|l| l.name)
        .collect();
    if providers.is_empty() {
        String::new()
    } else {
        format!(
            "; add one of these layers to the profile: {}",
            providers.join(", ")
        )
    }
}

/// Planning on small projects written for each case: the order of layers,
/// providers and conflicts, `when` clauses and values, and the errors.
#[cfg(test)]
mod tests {
    use super::*;

    /// A project with these layers (name, layer.toml) and one profile `p`
    /// listing `profile_layers`, making a bundle.
    fn project(layers: &[(&str, &str)], profile_layers: &[&str]) -> (tempfile::TempDir, Project) {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for (name, toml) in layers {
            let layer = root.join("layers").join(name);
            fs::create_dir_all(layer.join("root")).unwrap();
            fs::write(layer.join("layer.toml"), toml).unwrap();
        }
        fs::create_dir_all(root.join("profiles")).unwrap();
        fs::create_dir_all(root.join("images")).unwrap();
        fs::write(
            root.join("images/bundle.toml"),
            "description = \"bundle\"\n",
        )
        .unwrap();
        let list: Vec<String> = profile_layers.iter().map(|l| format!("{l:?}")).collect();
        fs::write(
            root.join("profiles/p.toml"),
            format!(
                "description = \"test\"\nlayers = [{}]\noutputs = [\"bundle\"]\n",
                list.join(", ")
            ),
        )
        .unwrap();
        let project = Project::locate(Some(root)).unwrap();
        (dir, project)
    }

    fn layer(requires: &[&str], provides: &[&str], conflicts: &[&str], extra: &str) -> String {
        let q = |l: &[&str]| {
            l.iter()
                .map(|s| format!("{s:?}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "description = \"x\"\nrequires = [{}]\nprovides = [{}]\nconflicts = [{}]\n{extra}",
            q(requires),
            q(provides),
            q(conflicts)
        )
    }

    fn plan_with(layers: &[(&str, String)], profile: &[&str], sets: &[&str]) -> Result<Plan> {
        let borrowed: Vec<(&str, &str)> = layers.iter().map(|(n, t)| (*n, t.as_str())).collect();
        let (_dir, project) = project(&borrowed, profile);
        let input = SiteInput {
            sets: sets.iter().map(|s| s.to_string()).collect(),
            ..SiteInput::default()
        };
        plan(&project, "p", &input)
    }

    fn names(plan: &Plan) -> Vec<&str> {
        plan.layers.iter().map(|l| l.name.as_str()).collect()
    }

    #[test]
    fn layers_come_after_the_layers_that_provide_what_they_require() {
        // (layers with their requires/provides, profile order, expected order)
        type Defs<'a> = &'a [(&'a str, &'a [&'a str], &'a [&'a str])];
        let cases: &[(Defs, &[&str], &[&str])] = &[
            (
                &[("app", &["db"], &[]), ("pg", &[], &["db"])],
                &["app", "pg"],
                &["pg", "app"],
            ),
            (
                &[
                    ("c", &["b"], &[]),
                    ("b", &["a"], &["b"]),
                    ("a", &[], &["a"]),
                ],
                &["c", "b", "a"],
                &["a", "b", "c"],
            ),
            // Layers that need nothing of each other keep the profile's order.
            (
                &[("x", &[], &[]), ("y", &[], &[])],
                &["y", "x"],
                &["y", "x"],
            ),
        ];
        for (defs, profile, expected) in cases {
            let layers: Vec<(&str, String)> = defs
                .iter()
                .map(|(n, req, prov)| (*n, layer(req, prov, &[], "")))
                .collect();
            let plan = plan_with(&layers, profile, &[]).unwrap();
            assert_eq!(names(&plan), *expected, "profile {profile:?}");
        }
    }

    #[test]
    fn providers_conflicts_and_missing_requirements_are_errors_that_say_which() {
        let cases: &[(&[(&str, String)], &str)] = &[
            (
                &[
                    ("nginx", layer(&[], &["proxy"], &[], "")),
                    ("caddy", layer(&[], &["proxy"], &[], "")),
                ],
                "both provide \"proxy\"",
            ),
            (
                &[
                    ("a", layer(&[], &["a"], &["b"], "")),
                    ("b", layer(&[], &["b"], &[], "")),
                ],
                "layer a conflicts with \"b\", which layer b provides",
            ),
            (
                &[("app", layer(&["db"], &[], &[], ""))],
                "layer app requires \"db\", which no layer of this profile provides",
            ),
        ];
        for (layers, expected) in cases {
            let profile: Vec<&str> = layers.iter().map(|(n, _)| *n).collect();
            let err = plan_with(layers, &profile, &[]).unwrap_err().to_string();
            assert!(err.contains(expected), "{expected:?} not in: {err}");
        }
    }

    #[test]
    fn when_clauses_include_a_layer_only_for_their_value() {
        let choice = "[values.proxy]\ntype = \"enum\"\nchoices = [\"nginx\", \"caddy\"]\ndefault = \"nginx\"\ndescription = \"d\"\n";
        let layers = vec![
            ("base", layer(&[], &[], &[], choice)),
            (
                "nginx",
                layer(&[], &["proxy"], &[], "[when]\nproxy = \"nginx\"\n"),
            ),
            (
                "caddy",
                layer(&[], &["proxy"], &[], "[when]\nproxy = \"caddy\"\n"),
            ),
        ];
        let profile = ["base", "nginx", "caddy"];
        for (sets, expected) in [
            (&[][..], &["base", "nginx"][..]),
            (&["proxy=caddy"][..], &["base", "caddy"][..]),
        ] {
            let plan = plan_with(&layers, &profile, sets).unwrap();
            assert_eq!(names(&plan), expected, "{sets:?}");
        }
        let err = plan_with(&layers, &profile, &["proxy=apache"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("proxy"), "{err}");
    }

    #[test]
    fn values_resolve_by_precedence_and_are_checked() {
        let decl = "[values.port]\ntype = \"port\"\ndefault = 8008\ndescription = \"d\"\n";
        let layers = vec![("a", layer(&[], &[], &[], decl))];
        for (sets, expected) in [
            (&[][..], Some(8008)),
            (&["port=9000"][..], Some(9000)),
            (&["port=9000", "port=9001"][..], Some(9001)),
            (&["port=0"][..], None),
            (&["port=http"][..], None),
        ] {
            match (plan_with(&layers, &["a"], sets), expected) {
                (Ok(plan), Some(port)) => {
                    assert_eq!(plan.values.get("port"), Some(&Json::from(port)), "{sets:?}")
                }
                (Err(e), None) => assert!(e.to_string().contains("port"), "{e}"),
                (got, want) => panic!("{sets:?}: got {:?}, wanted {want:?}", got.map(|p| p.values)),
            }
        }
        let err = plan_with(&layers, &["a"], &["nosuch=1"])
            .unwrap_err()
            .to_string();
        assert!(err.contains("nosuch"), "{err}");
    }
}
