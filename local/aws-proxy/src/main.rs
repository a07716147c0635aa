//! `aws-proxy --upstream http://127.0.0.1:5000 --listen 127.0.0.1:5100 --delay 3x`: one proxy in
//! front of one upstream, in the foreground until Ctrl-C. `--faults seed=7,throttle=0.02,…`
//! makes it misbehave as AWS does (the form is in the `faults` module's docs).
use aws_proxy::{spawn_with, Delay, FaultPlan, Options};
use clap::Parser;

/// Forwards every HTTP request to UPSTREAM and holds each answer back by DELAY.
#[derive(Parser)]
struct Args {
    /// Where requests go, e.g. http://127.0.0.1:5000 (a moto server).
    #[arg(long)]
    upstream: String,
    /// Address to listen on, e.g. 127.0.0.1:5100.
    #[arg(long)]
    listen: String,
    /// `3x`: each answer takes three times as long as the upstream took; `40ms`: 40 ms more.
    #[arg(long, default_value = "0ms", value_parser = Delay::parse)]
    delay: Delay,
    /// Seeded faults, e.g.
    /// `seed=7,throttle=0.02,5xx=0.01,slow=0.02,slow_by=300ms,drop=0.01,lost=0.01`
    /// (probabilities per request, together at most 1).
    #[arg(long, value_parser = FaultPlan::parse)]
    faults: Option<FaultPlan>,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let proxy = spawn_with(
        listener,
        &args.upstream,
        Options {
            delay: args.delay,
            faults: args.faults.clone(),
        },
    )
    .await?;
    let faults = args
        .faults
        .map_or_else(|| "no faults".to_string(), |plan| format!("faults {plan}"));
    println!(
        "aws-proxy {} -> {} ({:?}, {faults})",
        proxy.url(),
        args.upstream,
        args.delay
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
