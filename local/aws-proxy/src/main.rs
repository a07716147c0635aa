//! `aws-proxy --upstream http://127.0.0.1:5000 --listen 127.0.0.1:5100 --delay 3x`: one proxy in
//! front of one upstream, in the foreground until Ctrl-C.
use aws_proxy::{spawn, Delay};
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
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    let listener = tokio::net::TcpListener::bind(&args.listen).await?;
    let proxy = spawn(listener, &args.upstream, args.delay).await?;
    println!(
        "aws-proxy {} -> {} ({:?})",
        proxy.url(),
        args.upstream,
        args.delay
    );
    tokio::signal::ctrl_c().await?;
    Ok(())
}
