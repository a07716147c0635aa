//! `comfyui-emulator`: serves a local ComfyUI until Ctrl-C. Settings come from env vars:
//!
//! - `COMFYUI_LISTEN` (default `127.0.0.1:8188`, ComfyUI's own port);
//! - `COMFYUI_INPUT_DIR`, `COMFYUI_OUTPUT_DIR` (default `.local/comfyui/input`, `…/output`);
//! - `COMFYUI_TEMP_DIR` (default: `temp` beside the output dir);
//! - `COMFYUI_MIN_RUN_TIME_MS` (default 50), `COMFYUI_MAX_HISTORY` (default 10000),
//!   `COMFYUI_MAX_UPLOAD_BYTES` (default 100 MB);
//! - `COMFYUI_JOBS_API` (`true`|`false`, default true), `COMFYUI_BEARER_TOKEN` (default none).
//!
//! Faults are switched at run time through `/__admin/…` (see the crate docs).

use std::net::SocketAddr;
use std::process::ExitCode;
use std::str::FromStr;
use std::time::Duration;

use comfyui_emulator::ComfyConfig;

fn setting<T: FromStr>(name: &str, default: T) -> Result<T, String> {
    match std::env::var(name) {
        Ok(value) if !value.is_empty() => value
            .parse()
            .map_err(|_| format!("{name}: cannot parse '{value}'")),
        _ => Ok(default),
    }
}

fn config() -> Result<(ComfyConfig, SocketAddr), String> {
    let addr: SocketAddr = setting("COMFYUI_LISTEN", SocketAddr::from(([127, 0, 0, 1], 8188)))?;
    let input: String = setting("COMFYUI_INPUT_DIR", ".local/comfyui/input".to_owned())?;
    let output: String = setting("COMFYUI_OUTPUT_DIR", ".local/comfyui/output".to_owned())?;
    let mut config = ComfyConfig::new(input, output);
    if let Ok(temp) = std::env::var("COMFYUI_TEMP_DIR") {
        config.temp_dir = temp.into();
    }
    config.min_run_time = Duration::from_millis(setting("COMFYUI_MIN_RUN_TIME_MS", 50)?);
    config.max_history = setting("COMFYUI_MAX_HISTORY", config.max_history)?;
    config.max_upload_bytes = setting("COMFYUI_MAX_UPLOAD_BYTES", config.max_upload_bytes)?;
    config.jobs_api = setting("COMFYUI_JOBS_API", true)?;
    config.bearer_token = std::env::var("COMFYUI_BEARER_TOKEN")
        .ok()
        .filter(|t| !t.is_empty());
    Ok((config, addr))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let (config, addr) = match config() {
        Ok(parts) => parts,
        Err(err) => {
            eprintln!("comfyui-emulator: {err}");
            return ExitCode::from(2);
        }
    };
    let emulator = match comfyui_emulator::spawn(config, addr).await {
        Ok(emulator) => emulator,
        Err(err) => {
            eprintln!("comfyui-emulator: {err}");
            return ExitCode::FAILURE;
        }
    };
    println!(
        "ComfyUI emulator on {} (input {}, output {})",
        emulator.url,
        emulator.input_dir.display(),
        emulator.output_dir.display()
    );
    let _ = tokio::signal::ctrl_c().await;
    emulator.shutdown().await;
    ExitCode::SUCCESS
}
