//! Start the real `warren` binary on a free loopback port with its own data directory.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
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

/// How long [`Broker::restart`] keeps retrying when the port is still (or again) taken.
const RESTART_PORT_TIMEOUT: Duration = Duration::from_secs(10);

/// A running warren process. Killed when dropped.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    port: u16,
    /// Holds the log file, and the data dir unless one was given to [`Broker::start_in`];
    /// removed on drop.
    dir: TempDir,
    data_dir: PathBuf,
    log_path: PathBuf,
    exit: Option<ExitStatus>,
    /// The binary and extra flags it was started with, for [`Broker::restart`].
    bin: PathBuf,
    extra: Vec<String>,
    /// How many times the process was started (1 after `start`).
    starts: u32,
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

    /// Start warren with `--data-dir DIR` (created if missing, and left in place when the
    /// broker is dropped) instead of a fresh temporary one; otherwise as
    /// [`Broker::start_with`]. The log file still lives in the broker's own temp dir. Unlike
    /// `start_with`, this waits until warren answers the AMQP protocol header (so recovery of
    /// the existing data has finished), not merely until the port accepts connections.
    pub fn start_in(data_dir: &Path, extra: &[&str]) -> Result<Broker> {
        let bin = warren_bin();
        if !bin.is_file() {
            bail!(
                "warren binary not found at {}: run `cargo build --bin warren` first \
                 (or set WARREN_BIN to the binary to test)",
                bin.display()
            );
        }
        let mut last_err = None;
        for _ in 0..PORT_ATTEMPTS {
            match Broker::try_start_in(&bin, extra, Some(data_dir))? {
                Ok(mut broker) => {
                    broker.wait_amqp(STARTUP_TIMEOUT)?;
                    return Ok(broker);
                }
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
        Broker::try_start_in(bin, extra, None)
    }

    fn try_start_in(
        bin: &Path,
        extra: &[&str],
        data_dir: Option<&Path>,
    ) -> Result<Result<Broker, String>> {
        let port = free_port()?;
        let dir = tempfile::Builder::new()
            .prefix("warren-test-")
            .tempdir()
            .context("creating the broker's temp dir")?;
        let data_dir = data_dir
            .map(Path::to_path_buf)
            .unwrap_or_else(|| dir.path().join("data"));
        let log_path = dir.path().join("warren.log");
        let log =
            File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
        let extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        let child = spawn_warren(bin, port, &data_dir, &extra, log)?;
        let mut broker = Broker {
            child,
            port,
            dir,
            data_dir,
            log_path,
            exit: None,
            bin: bin.to_path_buf(),
            extra,
            starts: 1,
        };
        match broker.wait_listening(STARTUP_TIMEOUT)? {
            Ok(()) => Ok(Ok(broker)),
            Err(logs) => Ok(Err(logs)),
        }
    }

    /// Waits until the port accepts TCP connections. `Ok(Err(logs))`: warren exited because
    /// the port was taken. Any other early exit, or the timeout, is an error.
    fn wait_listening(&mut self, timeout: Duration) -> Result<Result<(), String>> {
        let port = self.port;
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                let logs = self.logs();
                if looks_like_addr_in_use(&logs) {
                    return Ok(Err(logs));
                }
                bail!(
                    "warren exited during startup ({status}) on port {port}; its output:\n{logs}"
                );
            }
            if TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)).is_ok() {
                return Ok(Ok(()));
            }
            if Instant::now() > deadline {
                let logs = self.logs();
                self.kill();
                bail!(
                    "warren did not accept connections on 127.0.0.1:{port} within {timeout:?}; \
                     its output:\n{logs}"
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Waits until warren answers the AMQP 0-9-1 protocol header with a frame (its
    /// connection.start): the broker accepts connections only once recovery has finished,
    /// although its port may be bound before.
    fn wait_amqp(&mut self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_exit() {
                bail!(
                    "warren exited ({status}) before answering AMQP on port {}; its output:\n{}",
                    self.port,
                    self.logs()
                );
            }
            if answers_amqp(self.addr(), Duration::from_millis(500)) {
                return Ok(());
            }
            if Instant::now() > deadline {
                let logs = self.logs();
                self.kill();
                bail!(
                    "warren did not answer the AMQP protocol header on 127.0.0.1:{} within \
                     {timeout:?}; its output:\n{logs}",
                    self.port
                );
            }
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// Starts warren again with the same binary, flags, port and data directory, and waits
    /// until it answers AMQP (recovery done). If the process is still running it is killed
    /// with SIGKILL first, so `broker.restart()` alone is a crash-restart; for a graceful one,
    /// call [`Broker::signal_term`] and [`Broker::wait_exit`] first. The log file is kept and
    /// appended to, after a `---- restart N ----` line.
    ///
    /// The port was free while warren was down, so another process may have taken it: this
    /// retries for a while (the other user may be a harness choosing ports), then fails.
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let deadline = Instant::now() + RESTART_PORT_TIMEOUT;
        loop {
            self.starts += 1;
            {
                let mut log = OpenOptions::new()
                    .append(true)
                    .open(&self.log_path)
                    .with_context(|| format!("opening {}", self.log_path.display()))?;
                writeln!(log, "---- restart {} ----", self.starts - 1)?;
                self.child = spawn_warren(&self.bin, self.port, &self.data_dir, &self.extra, log)?;
            }
            self.exit = None;
            match self.wait_listening(STARTUP_TIMEOUT)? {
                Ok(()) => return self.wait_amqp(STARTUP_TIMEOUT),
                Err(logs) if Instant::now() > deadline => bail!(
                    "warren could not bind its port {} again within {RESTART_PORT_TIMEOUT:?}; \
                     its output:\n{logs}",
                    self.port
                ),
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    /// SIGTERM, then wait up to `timeout` for the exit status (graceful shutdown). Fails if
    /// the process is still running afterwards.
    pub fn stop_gracefully(&mut self, timeout: Duration) -> Result<ExitStatus> {
        if let Some(status) = self.try_exit() {
            return Ok(status);
        }
        self.signal_term()?;
        match self.wait_exit(timeout) {
            Some(status) => Ok(status),
            None => bail!(
                "warren (pid {}) still running {timeout:?} after SIGTERM",
                self.child.id()
            ),
        }
    }

    /// How many times the process was started: 1, plus one per [`Broker::restart`].
    pub fn starts(&self) -> u32 {
        self.starts
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

/// Spawns warren on 127.0.0.1:`port` with `--data-dir data_dir` plus `extra`, output to `log`.
fn spawn_warren(
    bin: &Path,
    port: u16,
    data_dir: &Path,
    extra: &[String],
    log: File,
) -> Result<Child> {
    let log_err = log.try_clone()?;
    Command::new(bin)
        .arg("--listen")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .args(extra)
        .env_remove("WARREN_CONFIG")
        .env_remove("WARREN_LISTEN")
        .env_remove("WARREN_DATA_DIR")
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log_err))
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))
}

/// True when a server on `addr` answers the AMQP 0-9-1 protocol header with a frame within
/// `timeout` (a method frame, type 1, carrying connection.start).
pub fn answers_amqp(addr: SocketAddr, timeout: Duration) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, timeout) else {
        return false;
    };
    if s.set_read_timeout(Some(timeout)).is_err() || s.write_all(b"AMQP\x00\x00\x09\x01").is_err() {
        return false;
    }
    let mut first = [0u8; 1];
    matches!(s.read(&mut first), Ok(1) if first[0] == 1)
}

fn looks_like_addr_in_use(logs: &str) -> bool {
    let l = logs.to_ascii_lowercase();
    l.contains("address already in use") || l.contains("addrinuse") || l.contains("os error 98")
}
