//! The `warren` binary: parses flags, loads configuration, runs the broker or a diagnostic.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;
use warren_broker::config::Config;

/// mimalloc instead of glibc's malloc: allocation and free were about a quarter of the
/// instructions per message under callgrind, and glibc's arenas also fragment under the
/// many-threads, short-lived-buffer pattern of a broker.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use warren_broker::server::Server;

/// Warren: an AMQP 0-9-1 message broker compatible with RabbitMQ clients.
#[derive(Debug, Parser)]
#[command(name = "warren", version)]
struct Cli {
    /// TOML configuration file (env WARREN_CONFIG).
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Address to listen on for AMQP, host:port; repeat for several.
    #[arg(long)]
    listen: Vec<String>,
    /// Directory for persistent data.
    #[arg(long)]
    data_dir: Option<String>,
    /// Heartbeat interval offered to clients, seconds (0 disables).
    #[arg(long)]
    heartbeat: Option<String>,
    /// Largest frame offered to clients, bytes.
    #[arg(long)]
    frame_max: Option<String>,
    /// Highest channel number offered to clients.
    #[arg(long)]
    channel_max: Option<String>,
    /// Maximum number of open connections (0: unlimited).
    #[arg(long)]
    max_connections: Option<String>,
    /// Time allowed from TCP accept to connection.open-ok, milliseconds.
    #[arg(long)]
    handshake_timeout_ms: Option<String>,
    /// Default user created at boot.
    #[arg(long)]
    default_user: Option<String>,
    /// Password of the default user.
    #[arg(long)]
    default_pass: Option<String>,
    /// Virtual host created at boot.
    #[arg(long)]
    default_vhost: Option<String>,
    /// Users allowed to connect from loopback only, comma separated (empty: no restriction).
    #[arg(long)]
    loopback_users: Option<String>,
    /// Memory for messages before publishers are blocked: a fraction of RAM or bytes.
    #[arg(long)]
    memory_high_watermark: Option<String>,
    /// Fraction of the memory watermark above which queues page messages to disk.
    #[arg(long)]
    memory_paging_ratio: Option<String>,
    /// Free disk space (bytes) below which publishers are blocked.
    #[arg(long)]
    disk_free_limit: Option<String>,
    /// Milliseconds a delivery may stay unacknowledged before its channel is closed (0: no
    /// limit).
    #[arg(long)]
    consumer_timeout: Option<String>,
    /// Log filter, e.g. `info` or `warren_broker=debug`.
    #[arg(long)]
    log: Option<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Health checks.
    Diagnostics {
        #[command(subcommand)]
        check: Diagnostic,
    },
}

#[derive(Debug, Subcommand)]
enum Diagnostic {
    /// Exit 0 when an AMQP 0-9-1 broker answers on host:port.
    Ping {
        #[arg(long, default_value = "127.0.0.1")]
        host: String,
        #[arg(long, default_value_t = 5672)]
        port: u16,
        /// Give up after this many milliseconds.
        #[arg(long, default_value_t = 5000)]
        timeout_ms: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            // The logger may not be up yet (bad configuration), so report on stderr directly.
            let _ = writeln!(std::io::stderr(), "warren: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Some(Command::Diagnostics {
        check:
            Diagnostic::Ping {
                host,
                port,
                timeout_ms,
            },
    }) = &cli.command
    {
        return Ok(ping(host, *port, Duration::from_millis(*timeout_ms)));
    }
    let env: BTreeMap<String, String> = std::env::vars().collect();
    let file = cli
        .config
        .clone()
        .or_else(|| env.get("WARREN_CONFIG").map(PathBuf::from));
    let mut flags: Vec<(&str, String)> = Vec::new();
    if !cli.listen.is_empty() {
        flags.push(("listen", cli.listen.join(",")));
    }
    let optional = [
        ("data_dir", &cli.data_dir),
        ("heartbeat", &cli.heartbeat),
        ("frame_max", &cli.frame_max),
        ("channel_max", &cli.channel_max),
        ("max_connections", &cli.max_connections),
        ("handshake_timeout_ms", &cli.handshake_timeout_ms),
        ("default_user", &cli.default_user),
        ("default_pass", &cli.default_pass),
        ("default_vhost", &cli.default_vhost),
        ("loopback_users", &cli.loopback_users),
        ("log", &cli.log),
        ("memory_high_watermark", &cli.memory_high_watermark),
        ("disk_free_limit", &cli.disk_free_limit),
        ("memory_paging_ratio", &cli.memory_paging_ratio),
        ("consumer_timeout", &cli.consumer_timeout),
    ];
    for (key, value) in optional {
        if let Some(v) = value {
            flags.push((key, v.clone()));
        }
    }
    let config = Config::load(file.as_deref(), &env, &flags)?;
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_new(&config.log)
                .with_context(|| format!("invalid log filter '{}'", config.log))?,
        )
        .with_writer(std::io::stderr)
        .init();
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // tokio's LIFO slot stays on: an idle broker hands a delivery to the consumer's connection
    // on the same worker without waking another; busy connections spread their wakes
    // (`connection::spread_woken_tasks`).
    let runtime = builder
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let server = Server::bind(config).await?;
        server.run(shutdown_signal()).await;
        Ok::<_, anyhow::Error>(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut term), Ok(mut int)) => {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
            }
        }
        _ => {
            tracing::warn!("cannot install signal handlers; only Ctrl-C stops the broker");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Sends the protocol header and expects connection.start (a method frame) back.
fn ping(host: &str, port: u16, timeout: Duration) -> ExitCode {
    let probe = || -> anyhow::Result<()> {
        let addr = (host, port)
            .to_socket_addrs()?
            .next()
            .context("no address")?;
        let mut stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.write_all(b"AMQP\x00\x00\x09\x01")?;
        let mut header = [0u8; 7];
        stream.read_exact(&mut header)?;
        anyhow::ensure!(header[0] == 1, "unexpected reply from {addr}");
        Ok(())
    };
    match probe() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "warren diagnostics ping: {host}:{port}: {e:#}"
            );
            ExitCode::FAILURE
        }
    }
}
