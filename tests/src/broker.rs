//! Start the real `warren` binary on a free loopback port with its own data directory.

use std::fs::File;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

/// How long [`Broker::start`] waits for the port to accept connections.
pub const STARTUP_TIMEOUT: Duration = Duration::from_secs(10);

/// How many fresh ports [`Broker::start`] tries when the chosen one turned out to be taken.
const PORT_ATTEMPTS: usize = 5;

/// Path of the warren binary: `$WARREN_BIN`, else `$CARGO_TARGET_DIR/debug/warren`, else
/// `<workspace>/target/debug/warren`.
pub fn warren_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("WARREN_BIN") {
        return PathBuf::from(path);
    }
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    target_dir.join("debug").join("warren")
}

/// Root of the cargo workspace (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// Ask the kernel for a currently free port on 127.0.0.1. Another process may grab it before
/// warren binds it; [`Broker::start_with`] retries when that happens.
pub fn free_port() -> Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("binding 127.0.0.1:0")?;
    Ok(listener.local_addr()?.port())
}

/// A running warren process. Killed when dropped.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    port: u16,
    /// Holds the data dir and the log file; removed on drop.
    dir: TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
}

impl Broker {
    /// Start warren with the default flags (see [`Broker::start_with`]).
    pub fn start() -> Result<Broker> {
        Broker::start_with(&[])
    }

    /// Start warren with `--listen 127.0.0.1:PORT --data-dir <own temp dir>` plus `extra`
    /// flags, and wait until the port accepts TCP connections.
    pub fn start_with(extra: &[&str]) -> Result<Broker> {
        Broker::start_bin_with(&warren_bin(), extra)
    }

    /// Like [`Broker::start_with`] with an explicit binary instead of [`warren_bin`].
    pub fn start_bin_with(bin: &Path, extra: &[&str]) -> Result<Broker> {
        if !bin.is_file() {
            bail!(
                "warren binary not found at {}: run `cargo build --bin warren` first \
                 (or set WARREN_BIN to the binary to test)",
                bin.display()
            );
        }
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            match Broker::try_start(bin, extra)? {
                Ok(broker) => return Ok(broker),
                Err(addr_in_use_logs) => last_err = Some(addr_in_use_logs),
            }
        }
        bail!(
            "warren could not bind a free port after {PORT_ATTEMPTS} attempts; last log:\n{}",
            last_err.unwrap_or_default()
        )
    }

    /// One attempt. `Ok(Err(logs))` means the port was taken: try another one.
    fn try_start(bin: &Path, extra: &[&str]) -> Result<Result<Broker, String>> {
        let port = free_port()?;
        let dir = tempfile::Builder::new()
            .prefix("warren-test-")
            .tempdir()
            .context("creating the broker's temp dir")?;
        let data_dir = dir.path().join("data");
        let log_path = dir.path().join("warren.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let log_err = log.try_clone()?;
        let child = Command::new(bin)
            .arg("--listen")
            .arg(format!("127.0.0.1:{port}"))
            .arg("--data-dir")
            .arg(&data_dir)
            .args(extra)
            .env_remove("WARREN_CONFIG")
            .env_remove("WARREN_LISTEN")
            .env_remove("WARREN_DATA_DIR")
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .spawn()
            .with_context(|| format!("spawning {}", bin.display()))?;
        let mut broker = Broker {
            child,
            port,
            dir,
            data_dir,
            log_path,
            exit: None,
        };
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = broker.try_exit() {
                let logs = broker.logs();
                if looks_like_addr_in_use(&logs) {
                    return Ok(Err(logs));
                }
                bail!(
                    "warren exited during startup ({status}) on port {port}; its output:\n{logs}"
                );
            }
            if TcpStream::connect_timeout(&broker.addr(), Duration::from_millis(200)).is_ok() {
                return Ok(Ok(broker));
            }
            if Instant::now() > deadline {
                let logs = broker.logs();
                broker.kill();
                bail!(
                    "warren did not accept connections on 127.0.0.1:{port} within {:?}; its \
                     output:\n{logs}",
                    STARTUP_TIMEOUT
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// The TCP port warren listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `127.0.0.1:PORT`.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, self.port))
    }

    /// `amqp://guest:guest@127.0.0.1:PORT/%2f`.
    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// The `--data-dir` given to warren (inside the broker's own temp dir).
    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// The broker's temp dir (data dir and log file).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Process id of the warren process.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Send SIGTERM (graceful shutdown).
    pub fn signal_term(&self) -> Result<()> {
        self.signal("TERM")
    }

    /// Send a signal by name (`TERM`, `INT`, `KILL`, `STOP`, `CONT`...). Uses kill(1) so that
    /// this crate needs no unsafe code.
    pub fn signal(&self, name: &str) -> Result<()> {
        if self.exit.is_some() {
            bail!("warren already exited");
        }
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .context("running kill(1)")?;
        if !status.success() {
            bail!("kill -{name} {} failed: {status}", self.child.id());
        }
        Ok(())
    }

    /// The exit status if the process has exited, without waiting.
    pub fn try_exit(&mut self) -> Option<ExitStatus> {
        if self.exit.is_none() {
            if let Ok(Some(status)) = self.child.try_wait() {
                self.exit = Some(status);
            }
        }
        self.exit
    }

    /// Wait up to `timeout` for the process to exit; `None` if it is still running.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// SIGKILL the process and reap it.
    pub fn kill(&mut self) {
        if self.try_exit().is_none() {
            let _ = self.child.kill();
            if let Ok(status) = self.child.wait() {
                self.exit = Some(status);
            }
        }
    }

    /// Everything warren wrote to stdout and stderr so far.
    pub fn logs(&self) -> String {
        match std::fs::read(&self.log_path) {
            Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
            Err(e) => format!("<cannot read {}: {e}>", self.log_path.display()),
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Leave the broker's output next to the failing test's own.
            eprintln!(
                "---- warren log (port {}) ----\n{}---- end of warren log ----",
                self.port,
                self.logs()
            );
        }
    }
}

fn looks_like_addr_in_use(logs: &str) -> bool {
    let l = logs.to_ascii_lowercase();
    l.contains("address already in use") || l.contains("addrinuse") || l.contains("os error 98")
}
