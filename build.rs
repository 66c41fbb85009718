//! Binaries linked to llama.cpp's shared libraries (the `dynamic-link` and `dynamic-backends`
//! features) find them beside themselves, so that the directory can be copied to another machine.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_DYNAMIC_LINK").is_some() {
        println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    }
}
