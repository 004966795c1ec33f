//! `cargo xtask image`: stage the build context and build the OCI image (the logic lives in
//! `tests::image`, which the image test runs too).

use std::path::Path;

use anyhow::{anyhow, bail, Result};

use crate::{root, step};

pub fn image(bin: &Path, push: Option<&str>, archive: Option<&Path>) -> Result<()> {
    if !tests::image::tools_present() {
        bail!(
            "buildah, podman and runc are needed: run `cargo xtask setup` (Debian) or install them"
        );
    }
    let version = env!("CARGO_PKG_VERSION");
    let revision = tests::image::git_revision(&root());
    let context = root().join("target/image");
    step(&format!("image: staging {}", context.display()));
    tests::image::stage(bin, &root(), &context).map_err(|e| anyhow!(e))?;
    step("image: buildah build (vfs storage, timestamps at the epoch)");
    let built = tests::image::build(&context, version, &revision, tests::image::SOURCE)
        .map_err(|e| anyhow!(e))?;
    step(&format!(
        "image: {} ({}), {:.1} MiB, revision {revision}",
        built.reference,
        built.id,
        built.size as f64 / (1024.0 * 1024.0)
    ));
    if let Some(file) = archive {
        tests::image::archive(&built.reference, file).map_err(|e| anyhow!(e))?;
        step(&format!("image: OCI archive {}", file.display()));
    }
    if let Some(registry) = push {
        let dest =
            tests::image::push(&built.reference, registry, version).map_err(|e| anyhow!(e))?;
        step(&format!("image: pushed {dest}"));
    }
    Ok(())
}
