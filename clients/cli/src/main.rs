use std::process::ExitCode;

use clap::Parser;
use gateway_cli::cli::Cli;

#[tokio::main(flavor = "current_thread")]
async fn main() -> ExitCode {
    // Usage errors exit 2 here, as clap does; --help and --version exit 0.
    let cli = Cli::parse();
    match gateway_cli::commands::run(cli).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => {
            gateway_cli::output::err(&format!("error: {failure}"));
            ExitCode::from(failure.exit_code())
        }
    }
}
