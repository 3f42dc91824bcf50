//! The `sidecast` command: `serve` runs the server, `publish` sends events to one.
//!
//! Exit codes: 0 success; 1 runtime or startup failure (bind, socket in use); 2 bad
//! configuration or usage.

use std::io::{self, BufRead};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::value::RawValue;
use sidecast::config::{DEFAULT_PUBLISH_SOCKET, Settings};
use sidecast::{Config, Publisher, Server};

#[derive(Parser)]
#[command(
    name = "sidecast",
    version,
    about = "Real-time fan-out: Unix-socket publishers to WebSocket subscribers"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server
    Serve(Box<Settings>),
    /// Publish an event (CHANNEL JSON), or NDJSON commands read from stdin; prints replies
    Publish {
        /// The server's publish socket
        #[arg(long, value_name = "PATH", default_value = DEFAULT_PUBLISH_SOCKET)]
        socket: PathBuf,
        /// Channel to publish to (omit both arguments to read commands from stdin)
        #[arg(requires = "json")]
        channel: Option<String>,
        /// The event's data, any JSON value
        json: Option<String>,
    },
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(settings) => serve(*settings),
        Command::Publish {
            socket,
            channel: Some(channel),
            json: Some(json),
        } => publish_one(&socket, &channel, &json),
        Command::Publish { socket, .. } => publish_stdin(&socket),
    }
}

fn serve(settings: Settings) -> ExitCode {
    let config = match Config::load(settings) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("sidecast: {e}");
            return ExitCode::from(2);
        }
    };
    // RUST_LOG, when set, overrides the configured level.
    let _ = simple_logger::SimpleLogger::new()
        .with_level(config.log_level)
        .env()
        .init();
    let mut server = match Server::bind(config) {
        Ok(server) => server,
        Err(e) => {
            log::error!("{e}");
            return ExitCode::FAILURE;
        }
    };
    if let Err(e) = server.handle_signals() {
        log::error!("{e}");
        return ExitCode::FAILURE;
    }
    match server.run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error!("event loop failed: {e}");
            ExitCode::FAILURE
        }
    }
}

fn publish_one(socket: &PathBuf, channel: &str, json: &str) -> ExitCode {
    let data: &RawValue = match serde_json::from_str(json) {
        Ok(data) => data,
        Err(e) => {
            eprintln!("sidecast: JSON argument is not valid JSON: {e}");
            return ExitCode::from(2);
        }
    };
    let result = Publisher::connect(socket)
        .map_err(|e| format!("cannot connect to {}: {e}", socket.display()))
        .and_then(|mut p| {
            p.publish_confirmed(channel, data)
                .map_err(|e| e.to_string())
        });
    match result {
        Ok(ack) => {
            println!(
                "{{\"ok\":true,\"seq\":{},\"delivered\":{}}}",
                ack.seq, ack.delivered
            );
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sidecast: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Forwards stdin line by line, then prints every reply until the server closes.
fn publish_stdin(socket: &PathBuf) -> ExitCode {
    let run = || -> io::Result<bool> {
        let mut publisher = Publisher::connect(socket)?;
        for line in io::stdin().lock().lines() {
            publisher.send_line(&line?)?;
        }
        publisher.finish()?;
        let mut all_ok = true;
        while let Some(reply) = publisher.read_reply()? {
            all_ok &= reply.contains("\"ok\":true");
            println!("{reply}");
        }
        Ok(all_ok)
    };
    match run() {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("sidecast: {}: {e}", socket.display());
            ExitCode::FAILURE
        }
    }
}
