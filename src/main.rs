//! The `sidecast` command: `serve` runs the server, `publish` sends events to one, `bench`
//! load-tests one, `config` prints or checks a config file.
//!
//! Exit codes: 0 success; 1 runtime or startup failure (bind, socket in use); 2 bad
//! configuration or usage.

use std::io::{self, BufRead};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use serde_json::value::RawValue;
use sidecast::bench::soak::{self, SoakPlan, SoakReport};
use sidecast::bench::spawn::{SpawnedRedis, SpawnedServer};
use sidecast::bench::{self, Plan, Preset, Report, Step, Target};
use sidecast::config::{self, Settings};
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
    /// Load-test a running sidecast (or one it spawns) and print latency, throughput and memory
    Bench(Box<BenchArgs>),
    /// Print a config file of every setting with its default, or check one (--check FILE)
    Config {
        /// Validate this TOML file instead: exit 0 if `serve --config FILE` would accept it
        #[arg(long, value_name = "FILE")]
        check: Option<PathBuf>,
    },
    /// Publish an event (CHANNEL JSON), or NDJSON commands read from stdin; prints replies
    Publish {
        /// The server's publish socket
        #[arg(long, value_name = "PATH", default_value = config::default_of("publish_socket"))]
        socket: PathBuf,
        /// Channel to publish to (omit both arguments to read commands from stdin)
        #[arg(requires = "json")]
        channel: Option<String>,
        /// The event's data, any JSON value
        json: Option<String>,
        /// Ask the pages to acknowledge the event within this time (e.g. 5s), and print the
        /// ack report that follows the reply
        #[arg(long, value_name = "DURATION", requires = "json")]
        ack: Option<config::HumanDuration>,
    },
}

#[derive(clap::Args)]
struct BenchArgs {
    /// The scenario
    #[arg(value_enum)]
    preset: Preset,
    /// The server's WebSocket URL, e.g. ws://127.0.0.1:3001/ws (never guessed)
    #[arg(long)]
    url: String,
    /// The server's publish socket (never guessed)
    #[arg(long, value_name = "PATH")]
    socket: PathBuf,
    /// The server's pid, to report its CPU time and memory
    #[arg(long, conflicts_with = "spawn")]
    pid: Option<u32>,
    /// Start the server from this binary on --url and --socket, and stop it afterwards
    #[arg(long)]
    spawn: bool,
    /// With --spawn: pin the server to this CPU (taskset); pin the bench with taskset yourself
    #[arg(long, requires = "spawn")]
    server_cpu: Option<usize>,
    /// With --spawn: run two nodes over a spawned redis-server (--engine redis): the
    /// subscribers on --url's node, the publishes on --socket's, so every event crosses Redis.
    /// The server figures are the subscribers' node's
    #[arg(long, requires = "spawn")]
    cross_node: bool,
    /// With --cross-node: pin redis-server and the publishing node to this CPU
    #[arg(long, requires = "cross_node")]
    redis_cpu: Option<usize>,
    /// Override the preset's number of connections
    #[arg(long)]
    connections: Option<usize>,
    /// How the clients receive: WebSocket (`/ws`) or Server-Sent Events (`/sse`)
    #[arg(long, value_enum, default_value = "websocket")]
    transport: sidecast::bench::Transport,
    /// The WebSocket clients offer permessage-deflate, as browsers do (the server must agree)
    #[arg(long)]
    deflate: bool,
    /// What each event's data looks like: padded (`t` and 160 bytes of one letter), progress
    /// (a render job's progress, a frame of about 190 B) or task (a task update, about 1.4 KB)
    #[arg(long, value_enum, default_value = "padded")]
    event: sidecast::bench::EventShape,
    /// Override the preset's number of channels
    #[arg(long)]
    channels: Option<usize>,
    /// Run one step at this many publishes per second instead of the preset's steps
    #[arg(long)]
    rate: Option<u64>,
    /// Override each step's duration
    #[arg(long, value_name = "DURATION")]
    duration: Option<sidecast::config::HumanDuration>,
    /// Allow a target that is not on a loopback address
    #[arg(long)]
    allow_remote: bool,
    /// Print the report as JSON
    #[arg(long)]
    json: bool,
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Serve(settings) => serve(*settings),
        Command::Bench(args) => run_bench(*args),
        Command::Config { check: None } => {
            print!("{}", config::render_defaults());
            ExitCode::SUCCESS
        }
        Command::Config { check: Some(file) } => check_config(file),
        Command::Publish {
            socket,
            channel: Some(channel),
            json: Some(json),
            ack,
        } => publish_one(&socket, &channel, &json, ack.map(|a| a.0)),
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

/// `sidecast config --check FILE`: loads the file as `serve --config FILE` would.
fn check_config(file: PathBuf) -> ExitCode {
    let settings = Settings {
        config: Some(file.clone()),
        ..Settings::default()
    };
    match Config::load(settings) {
        Ok(_) => {
            println!("{}: ok", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sidecast: {e}");
            ExitCode::from(2)
        }
    }
}

fn publish_one(
    socket: &PathBuf,
    channel: &str,
    json: &str,
    ack: Option<std::time::Duration>,
) -> ExitCode {
    let data: &RawValue = match serde_json::from_str(json) {
        Ok(data) => data,
        Err(e) => {
            eprintln!("sidecast: JSON argument is not valid JSON: {e}");
            return ExitCode::from(2);
        }
    };
    let result = Publisher::connect(socket)
        .map_err(|e| unreachable_socket(socket, &e))
        .and_then(|mut p| {
            let line = match ack {
                Some(timeout) => p.publish_acked(channel, data, timeout).map(|r| {
                    format!(
                        "{{\"type\":\"ack_report\",\"seq\":{},\"delivered\":{},\"acked\":{},\"timedOut\":{},\"disconnected\":{},\"lost\":{},\"nodes\":{},\"nodesLost\":{}}}",
                        r.seq, r.delivered, r.acked, r.timed_out, r.disconnected, r.lost, r.nodes, r.nodes_lost
                    )
                }),
                None => p.publish_confirmed(channel, data).map(|ack| {
                    let reach = match (ack.delivered, ack.nodes) {
                        (Some(n), _) => format!("\"delivered\":{n}"),
                        (None, Some(n)) => format!("\"nodes\":{n}"),
                        (None, None) => String::new(),
                    };
                    format!("{{\"ok\":true,\"seq\":{},{reach}}}", ack.seq)
                }),
            };
            line.map_err(|e| e.to_string())
        });
    match result {
        Ok(line) => {
            println!("{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sidecast: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Why the publish socket cannot be reached, and what to check.
fn unreachable_socket(socket: &Path, error: &io::Error) -> String {
    let path = socket.display();
    let hint = match error.kind() {
        io::ErrorKind::NotFound => {
            format!("no socket there: is `sidecast serve` running, with --publish-socket {path}?")
        }
        io::ErrorKind::ConnectionRefused => {
            "the file exists but no server listens on it (left by a stopped server?)".into()
        }
        io::ErrorKind::PermissionDenied => {
            "permission denied: the socket's mode is publish_socket_mode (0660 by default); \
             run as its owner or group"
                .into()
        }
        _ => error.to_string(),
    };
    format!("cannot connect to {path}: {hint}")
}

/// Forwards stdin line by line, then prints every reply until the server closes.
fn publish_stdin(socket: &PathBuf) -> ExitCode {
    let mut publisher = match Publisher::connect(socket) {
        Ok(publisher) => publisher,
        Err(e) => {
            eprintln!("sidecast: {}", unreachable_socket(socket, &e));
            return ExitCode::FAILURE;
        }
    };
    let mut run = || -> io::Result<bool> {
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

fn run_bench(args: BenchArgs) -> ExitCode {
    let _ = simple_logger::SimpleLogger::new()
        .with_level(log::LevelFilter::Warn)
        .env()
        .init();
    let addr = match bench::resolve_url(&args.url) {
        Ok(addr) if addr.ip().is_loopback() || args.allow_remote => addr,
        Ok(addr) => {
            eprintln!(
                "sidecast: {addr} is not a loopback address; pass --allow-remote to load it anyway"
            );
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("sidecast: --url: {e}");
            return ExitCode::from(2);
        }
    };
    let mut plan = Plan::preset(args.preset);
    plan.transport = args.transport;
    plan.deflate = args.deflate;
    plan.event = args.event;
    plan.connections = args.connections.unwrap_or(plan.connections);
    plan.channels = args
        .channels
        .unwrap_or(plan.channels)
        .clamp(1, plan.connections.max(1));
    if let Some(rate) = args.rate {
        let duration = plan
            .steps
            .first()
            .map_or(std::time::Duration::from_secs(10), |s| s.duration);
        plan.steps = vec![Step { rate, duration }];
    }
    if let Some(duration) = args.duration {
        plan.steps.iter_mut().for_each(|s| s.duration = duration.0);
    }
    let exe = std::env::current_exe().expect("the running binary has a path");
    // Cross-node: Redis and the publishing node first; the measured node subscribes.
    let (redis, subscribers_socket) = if args.cross_node {
        match SpawnedRedis::start(args.redis_cpu) {
            Ok(redis) => {
                eprintln!("redis {}", redis.url);
                (Some(redis), args.socket.with_extension("subscribers.sock"))
            }
            Err(e) => {
                eprintln!("sidecast: cannot start redis-server: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        (None, args.socket.clone())
    };
    let mut server_args: Vec<String> = match &redis {
        Some(redis) => ["--engine", "redis", "--redis-url", &redis.url]
            .map(String::from)
            .to_vec(),
        None => Vec::new(),
    };
    if args.preset == Preset::Presence {
        let presence = ["--presence-channels", bench::presence::CHANNEL];
        server_args.extend(presence.map(String::from));
        server_args.extend(["--max-presence-members", "100000"].map(String::from));
    }
    if plan.ack.is_some() {
        // Every client acks every event as it comes, one message each (the worst case for
        // the server; sidecast.js batches them): 200 a second, over the default budget.
        server_args.extend(["--rate-limit", "1000", "--rate-burst", "1000"].map(String::from));
    }
    // Its WebSocket port takes half the pages of the presence preset.
    let other_addr = match std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()) {
        Ok(addr) => addr,
        Err(e) => {
            eprintln!("sidecast: no free loopback port: {e}");
            return ExitCode::FAILURE;
        }
    };
    let publishing_node = match &redis {
        Some(_) => {
            let node = SpawnedServer::start(
                &exe,
                other_addr,
                &args.socket,
                args.redis_cpu,
                plan.connections + 100,
                &server_args,
            );
            match node {
                Ok(node) => {
                    eprintln!("publishing node pid {}", node.pid());
                    Some(node)
                }
                Err(e) => {
                    eprintln!("sidecast: cannot start the publishing node: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        None => None,
    };
    let spawn = || {
        SpawnedServer::start(
            &exe,
            addr,
            &subscribers_socket,
            args.server_cpu,
            plan.connections + 100,
            &server_args,
        )
    };
    let mut spawned = if args.spawn {
        match spawn() {
            Ok(server) => Some(server),
            Err(e) => {
                eprintln!("sidecast: cannot start the server: {e}");
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };
    if args.preset == Preset::Soak {
        let soak = SoakPlan {
            duration: plan.steps[0].duration,
            channels: plan.channels,
            steady: plan.connections,
            rate: plan.steps[0].rate,
            ..SoakPlan::default()
        };
        let pid = args.pid.or(spawned.as_ref().map(SpawnedServer::pid));
        let mut restart = || {
            spawned = None; // SIGTERM, and wait for the exit
            let server = spawn()?;
            let pid = server.pid();
            spawned = Some(server);
            Ok(Some(pid))
        };
        let hook: Option<soak::RestartHook<'_>> =
            if args.spawn { Some(&mut restart) } else { None };
        let result = soak::run(&soak, addr, args.socket.clone(), pid, hook, !args.json);
        return print_report(result, args.json, SoakReport::render);
    }
    if args.preset == Preset::Presence {
        let pid = args.pid.or(spawned.as_ref().map(SpawnedServer::pid));
        let mut addrs = vec![addr];
        let mut pids: Vec<u32> = pid.into_iter().collect();
        if let Some(node) = &publishing_node {
            addrs.push(other_addr);
            pids.push(node.pid());
        }
        let result = bench::presence::run(plan.connections, &addrs, &pids, !args.json);
        drop((spawned, publishing_node, redis));
        return print_report(result, args.json, bench::presence::PresenceReport::render);
    }
    let target = Target {
        addr,
        socket: args.socket,
        pid: args.pid.or(spawned.as_ref().map(SpawnedServer::pid)),
    };
    let result = bench::run(&plan, &target, !args.json);
    // The nodes stop before their Redis.
    drop((spawned, publishing_node, redis));
    print_report(result, args.json, Report::render)
}

/// Prints a bench report, as JSON with `--json`.
fn print_report<R: serde::Serialize>(
    result: io::Result<R>,
    json: bool,
    render: fn(&R) -> String,
) -> ExitCode {
    match result {
        Ok(report) if json => {
            let text = serde_json::to_string_pretty(&report).expect("reports serialize");
            println!("{text}");
            ExitCode::SUCCESS
        }
        Ok(report) => {
            print!("{}", render(&report));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("sidecast: bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}
