//! The `dead-letter-handler` function for the Fission Rust environment: it stores each message
//! the connector refused, with why, so that dead letters are durable and listed by the twins API
//! (see `entwine_functions::fission` for its configuration).

fn main() -> std::process::ExitCode {
    entwine_functions::fission::main(entwine_functions::handlers::Function::DeadLetter)
}
