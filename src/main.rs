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
mod replicas_cmd;
mod report_cmd;
mod telemetry;
mod workload_cmd;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let args = cli::Cli::parse();
    let telemetry = match telemetry::init() {
        Ok(t) => t,
        Err(e) => {
            eprintln!("herald: error[config_invalid]: telemetry: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("herald: error[internal]: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(cli::run(args));
    // Exporters flush on their own threads; stop them outside the runtime.
    drop(runtime);
    drop(telemetry);
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("herald: {e}");
            ExitCode::FAILURE
        }
    }
}
