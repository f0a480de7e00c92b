//! The `twin-evaluator` function for the Fission Rust environment, run by a time trigger: it
//! re-evaluates every twin at the current time so that a silent device shows (see
//! `entwine_functions::fission` for its configuration).

fn main() -> std::process::ExitCode {
    entwine_functions::fission::main(entwine_functions::handlers::Function::TwinEvaluator)
}
