//! `herald`: the server, the admin commands and the client commands in one binary.
#![forbid(unsafe_code)]

mod audit_cmd;
mod ca_cmd;
mod cli;
mod dev_cmd;
mod exchange_cmd;
mod federation_cmd;
mod node_cmd;
mod policy_cmd;
mod remedy;
mod replicas_cmd;
mod report_cmd;
mod telemetry;
mod workload_cmd;

use std::process::ExitCode;

use clap::Parser;

/// The server's allocator. With glibc's, allocation was about a tenth of
/// an issuance's server CPU (`malloc`, `free` and their consolidation on
/// the request path; `docs/performance.md`). The node agent
/// (`herald-agent`) keeps the system allocator: its target is memory.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let telemetry = match telemetry::init() {
        Ok(t) => t,
        Err(e) => {
            let e = cli::CliError::new("config_invalid", format!("telemetry: {e:#}")).with_fix(
                "check the OTEL_* environment variables (OTEL_EXPORTER_OTLP_ENDPOINT is a URL such as http://collector:4318), or unset them to turn export off",
            );
            return fail(&e);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let e = cli::CliError::new("internal", format!("cannot start the async runtime: {e}"))
                .with_fix("the system refused threads or file descriptors: check ulimit -u / -n and free memory");
            return fail(&e);
        }
    };
    let result = runtime.block_on(cli::run(args));
    // Exporters flush on their own threads; stop them outside the runtime.
    drop(runtime);
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// Prints an error: the stable first line (scripts match `error[code]`),
/// then what to do.
fn fail(e: &cli::CliError) -> ExitCode {
    eprintln!("herald: {e}");
    if let Some(fix) = e.fix() {
        eprintln!("  fix: {fix}");
    }
    ExitCode::FAILURE
}
