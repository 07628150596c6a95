//! The connectors embedded in the binary (built by `connect/build.rs`).

include!(concat!(env!("OUT_DIR"), "/builtin.rs"));

/// The component of a connector that ships with Runnel.
pub fn component(name: &str) -> Option<&'static [u8]> {
    BUILTIN
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, wasm)| *wasm)
}
