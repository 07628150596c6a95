//! Compiles the connectors that ship with Runnel (`connect/connectors`) to Wasm
//! components, so the `runnel` binary embeds them and users name them in a connector file
//! (`connector: file-source`) without building anything.

use std::path::{Path, PathBuf};
use std::process::Command;

const CONNECTORS: &[&str] = &[
    "file-source",
    "file-sink",
    "http-source",
    "http-sink",
    "postgres-sink",
];

fn main() {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo"));
    let sources = manifest_dir.join("connectors");
    for watched in ["connectors", "../sdk", "../proto/wit", "../proto/flat"] {
        println!(
            "cargo:rerun-if-changed={}",
            manifest_dir.join(watched).display()
        );
    }
    // The guest build shares one directory per target directory, whatever the profile.
    let target_dir = out_dir
        .ancestors()
        .find(|dir| dir.join("CACHEDIR.TAG").exists())
        .map_or_else(|| out_dir.join("wasm"), |dir| dir.join("wasm-connectors"));
    ensure_wasm_target();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command
        .args([
            "build",
            "--release",
            "--locked",
            "--target",
            "wasm32-wasip2",
            "--manifest-path",
        ])
        .arg(sources.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .current_dir(&sources);
    // The host build's settings (clippy as a wrapper, flags for the host target) must
    // not leak into the guest build.
    for var in [
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "CARGO_BUILD_TARGET",
        "CARGO_TARGET_DIR",
        "CARGO_MAKEFLAGS",
        "MAKEFLAGS",
        "MFLAGS",
        "CARGO_PRIMARY_PACKAGE",
    ] {
        command.env_remove(var);
    }
    let status = command.status().unwrap_or_else(|err| {
        panic!(
            "cannot run cargo to build the connectors in {}: {err}",
            sources.display()
        )
    });
    if !status.success() {
        panic!(
            "building the connectors in {} failed (see above). They compile to Wasm: \
             install the target with `rustup target add wasm32-wasip2`",
            sources.display()
        );
    }
    let built = target_dir.join("wasm32-wasip2/release");
    let mut table = String::from("/// The connectors that ship with Runnel: (name, component).\n");
    table.push_str("pub static BUILTIN: &[(&str, &[u8])] = &[\n");
    for name in CONNECTORS {
        let file = built.join(format!("{}.wasm", name.replace('-', "_")));
        if !file.exists() {
            panic!("the connector build did not produce {}", file.display());
        }
        let copy = out_dir.join(format!("{name}.wasm"));
        std::fs::copy(&file, &copy).expect("copying a connector component");
        table.push_str(&format!(
            "    ({name:?}, include_bytes!({:?})),\n",
            path_str(&copy)
        ));
    }
    table.push_str("];\n");
    std::fs::write(out_dir.join("builtin.rs"), table).expect("writing builtin.rs");
}

/// Installs the wasm32-wasip2 standard library with rustup when it is missing, so that a
/// plain `cargo build` works on a fresh machine.
fn ensure_wasm_target() {
    let rustc = std::env::var("RUSTC").unwrap_or_else(|_| "rustc".into());
    let sysroot = Command::new(rustc)
        .args(["--print", "sysroot"])
        .output()
        .ok()
        .map(|out| String::from_utf8_lossy(&out.stdout).trim().to_string());
    let installed = sysroot
        .as_ref()
        .is_some_and(|root| Path::new(root).join("lib/rustlib/wasm32-wasip2").exists());
    if installed {
        return;
    }
    println!(
        "cargo:warning=installing the wasm32-wasip2 target with rustup (the connectors compile to Wasm)"
    );
    let _ = Command::new("rustup")
        .args(["target", "add", "wasm32-wasip2"])
        .env_remove("RUSTC")
        .status();
}

fn path_str(path: &Path) -> String {
    path.display().to_string()
}
