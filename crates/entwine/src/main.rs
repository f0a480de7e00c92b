//! `entwine`: the twin platform's command line. Parses flags, sets up tracing and hands over to
//! the library (`entwine::cli`).

use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = entwine::cli::Cli::parse();
    // Each digital state is printed as a lifecycle change by `entwine up`, not logged; the
    // embedded broker logs every connection at info, and routine disconnections as errors.
    // A bench or an experiment prints its own progress and results; only problems are logged.
    let default_filter = match cli.command {
        entwine::cli::Command::Bench(_) | entwine::cli::Command::Experiment(_) => {
            "warn,rumqttd=off"
        }
        _ => "info,rumqttd=off,entwine_functions::handlers=warn",
    };
    entwine_functions::telemetry::init(
        entwine_functions::telemetry::Format::Pretty,
        default_filter,
    );
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(entwine::cli::run(cli)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // A setting that cannot be used (a bad DATABASE_URL, an HTTP limit, a listener beyond
        // loopback without tokens) is a usage error, exit code 2 as for a bad flag; anything
        // else failed while running: 1.
        Err(e) if entwine_functions::fission::is_configuration_error(&e) || refused_setting(&e) => {
            eprintln!("error: {}", report(&e));
            std::process::ExitCode::from(2)
        }
        Err(e) => {
            eprintln!("error: {}", report(&e));
            std::process::ExitCode::FAILURE
        }
    }
}

/// Whether the platform or the twins service refused a setting before starting anything (an
/// address beyond loopback without tokens, a broker the connector cannot use): a usage error.
fn refused_setting(error: &anyhow::Error) -> bool {
    error.chain().any(|cause| {
        matches!(
            cause.downcast_ref::<entwine_platform::PlatformError>(),
            Some(entwine_platform::PlatformError::Config(_))
        )
    })
}

/// An error and its causes, `: `-separated, each said once: sqlx repeats a cause's text inside
/// its own message ("while executing migration 2: error returned from database: …"), which
/// `{:#}` would print two or three times.
fn report(error: &anyhow::Error) -> String {
    let mut text = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if text.contains(&cause) {
            continue;
        }
        if !text.is_empty() {
            text.push_str(": ");
        }
        text.push_str(&cause);
    }
    text
}
