//! Profiles: `profiles/<name>.toml` — which layers, which values, which
//! outputs — with `extends` resolved into one flat profile.

use std::collections::BTreeMap;
use std::fs;

use anyhow::{anyhow, Context, Result};
use serde::Deserialize;

use crate::error::{did_you_mean, usage};
use crate::layer::check_name;
use crate::project::Project;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProfileToml {
    pub description: String,
    /// A profile whose layers, values and outputs this one starts from.
    pub extends: Option<String>,
    /// Layers added after the parent's, in order.
    #[serde(default)]
    pub layers: Vec<String>,
    /// Parent layers to leave out.
    #[serde(default)]
    pub remove_layers: Vec<String>,
    /// Site values this profile sets (users can still override them).
    #[serde(default)]
    pub values: BTreeMap<String, toml::Value>,
    /// Image kinds to produce (`images/<kind>.toml`); inherited if unset.
    pub outputs: Option<Vec<String>>,
    /// The disk image's version (`IMAGE_VERSION`); `build --version` wins.
    /// Unset: made from the build epoch.
    pub version: Option<String>,
}

/// A profile with its `extends` chain applied.
#[derive(Debug, Clone)]
pub struct Profile {
    pub name: String,
    pub description: String,
    pub layers: Vec<String>,
    /// Each value with the profile file that set it last.
    pub values: BTreeMap<String, (String, toml::Value)>,
    pub outputs: Vec<String>,
    pub version: Option<String>,
}

impl Profile {
    pub fn load(project: &Project, name: &str) -> Result<Profile> {
        let mut chain: Vec<(String, ProfileToml)> = Vec::new();
        let mut next = Some(name.to_string());
        while let Some(current) = next {
            if chain.iter().any(|(n, _)| *n == current) {
                let cycle: Vec<&str> = chain
                    .iter()
                    .map(|(n, _)| n.as_str())
                    .chain([current.as_str()])
                    .collect();
                return Err(anyhow!(
                    "profiles extend each other in a cycle: {}",
                    cycle.join(" → ")
                ));
            }
            let toml = read(project, &current, chain.last().map(|(n, _)| n.as_str()))?;
            next = toml.extends.clone();
            chain.push((current, toml));
        }

        let mut profile = Profile {
            name: name.to_string(),
            description: chain[0].1.description.clone(),
            layers: Vec::new(),
            values: BTreeMap::new(),
            outputs: Vec::new(),
            version: None,
        };
        for (pname, toml) in chain.iter().rev() {
            let file = format!("profiles/{pname}.toml");
            for removed in &toml.remove_layers {
                if !profile.layers.contains(removed) {
                    return Err(anyhow!(
                        "{file}: remove_layers names {removed:?}, which the profiles it extends do not have"
                    ));
                }
                profile.layers.retain(|l| l != removed);
            }
            for layer in &toml.layers {
                check_name(layer).map_err(|why| anyhow!("{file}: layer {why}"))?;
                if profile.layers.contains(layer) {
                    return Err(anyhow!(
                        "{file}: layer {layer:?} is listed twice (here or in a parent)"
                    ));
                }
                profile.layers.push(layer.clone());
            }
            for (k, v) in &toml.values {
                profile.values.insert(k.clone(), (file.clone(), v.clone()));
            }
            if let Some(outputs) = &toml.outputs {
                profile.outputs = outputs.clone();
            }
            if let Some(version) = &toml.version {
                profile.version = Some(version.clone());
            }
        }
        if profile.outputs.is_empty() {
            profile.outputs = vec!["bundle".to_string()];
        }
        let kinds = project.image_kinds()?;
        for output in &profile.outputs {
            if !kinds.contains(output) {
                return Err(anyhow!(
                    "profiles/{name}.toml: output {output:?} is not an image kind (images/*.toml: {}){}",
                    kinds.join(", "),
                    did_you_mean(output, kinds.iter().map(String::as_str))
                ));
            }
        }
        Ok(profile)
    }
}

fn read(project: &Project, name: &str, extended_by: Option<&str>) -> Result<ProfileToml> {
    let path = project.profiles_dir().join(format!("{name}.toml"));
    if check_name(name).is_err() || !path.is_file() {
        let known = project.profile_names()?;
        let what = match extended_by {
            Some(child) => format!("profiles/{child}.toml extends unknown profile {name:?}"),
            None => format!("unknown profile {name:?}"),
        };
        return Err(usage(format!(
            "{what}{}; known profiles: {} (see `builder profiles`)",
            did_you_mean(name, known.iter().map(String::as_str)),
            known.join(", ")
        )));
    }
    let text = fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow!("{}: {}", path.display(), e.to_string().trim_end()))
}
