//! The builder's library. The binary (main.rs) reaches it through `cli` (the
//! command line's definition and dispatch) and `error` (exit codes) only;
//! every other module is crate-private, so the compiler reports what nothing
//! uses. Modules depend on each other without cycles: file trees (`tree`),
//! image declarations (`image_decl`), the manifest's records (`manifest`) and
//! the namespace runner (`chroot`) sit below everything that uses them.

pub(crate) mod build;
pub(crate) mod bundle;
pub(crate) mod cache;
pub(crate) mod chroot;
pub mod cli;
pub(crate) mod debian;
pub(crate) mod digest;
pub(crate) mod disk;
pub(crate) mod epoch;
pub mod error;
pub(crate) mod image_decl;
pub(crate) mod images;
pub(crate) mod inspect;
pub(crate) mod install;
pub(crate) mod jsondoc;
pub(crate) mod kind;
pub(crate) mod layer;
pub(crate) mod manifest;
pub(crate) mod names;
pub(crate) mod oci;
pub(crate) mod outdir;
pub(crate) mod pack;
pub(crate) mod pgzip;
pub(crate) mod plan;
pub(crate) mod profile;
pub(crate) mod progress;
pub(crate) mod project;
pub(crate) mod render;
pub(crate) mod stamp;
pub(crate) mod template;
pub mod tools_root;
pub(crate) mod tree;
pub(crate) mod values;
pub(crate) mod verify;
