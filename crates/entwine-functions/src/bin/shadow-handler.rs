//! The `shadow-handler` function for the Fission Rust environment: serves HTTP on
//! `127.0.0.1:$FISSION_RUNTIME_PORT` and reads its configuration from the mounted ConfigMaps
//! and Secret (see `entwine_functions::fission`).

fn main() -> std::process::ExitCode {
    entwine_functions::fission::main(entwine_functions::handlers::Function::Shadow)
}
