//! Broker settings: embedded defaults overlaid by a TOML file, `WARREN_*` variables and flags.
//!
//! Every value is applied through [`Config::set`], so the same validation (and the same error
//! naming the key and where the value came from) serves the file, the environment and the CLI.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Where a setting's value came from; named in every error so the user knows what to fix.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    File(PathBuf),
    Env(String),
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(p) => write!(f, "file {}", p.display()),
            Origin::Env(v) => write!(f, "environment variable {v}"),
            Origin::Flag(v) => write!(f, "command-line flag {v}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("invalid value {value} for key '{key}' in {origin}: {reason}")]
    Invalid {
        key: String,
        value: String,
        origin: Origin,
        reason: String,
    },
    #[error("unknown key '{key}' in {origin}")]
    UnknownKey { key: String, origin: Origin },
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path} is not valid TOML: {message}")]
    Parse { path: PathBuf, message: String },
}

/// Effective broker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub listen: Vec<SocketAddr>,
    pub data_dir: PathBuf,
    /// Heartbeat interval offered in connection.tune, seconds (0 disables).
    pub heartbeat: u16,
    /// Largest frame (header + payload + end octet) offered in connection.tune.
    pub frame_max: u32,
    pub channel_max: u16,
    /// 0 means unlimited.
    pub max_connections: usize,
    /// Time from TCP accept to connection.open-ok.
    pub handshake_timeout: Duration,
    pub default_user: String,
    pub default_pass: String,
    pub default_vhost: String,
    /// Users allowed to log in only from a loopback address (RabbitMQ's `loopback_users`).
    pub loopback_users: Vec<String>,
    pub log: String,
    /// When messages held in memory reach this, publishing connections are blocked.
    pub memory_high_watermark: Watermark,
    /// Fraction of the watermark above which queues page messages out to disk (RabbitMQ's
    /// `vm_memory_high_watermark_paging_ratio`); above 1 paging never starts.
    pub memory_paging_ratio: f64,
    /// When free space on the data directory's file system falls below this many bytes,
    /// publishing connections are blocked (RabbitMQ's `disk_free_limit`).
    pub disk_free_limit: u64,
    /// A channel holding a delivery unacknowledged for longer is closed with 406, and the
    /// delivery requeued (RabbitMQ's `consumer_timeout`); None disables the check.
    pub consumer_timeout: Option<Duration>,
}

/// RabbitMQ's `vm_memory_high_watermark`: a fraction of RAM or an absolute byte count.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Watermark {
    Relative(f64),
    Absolute(u64),
}

impl Watermark {
    /// The limit in bytes for a machine with `total` bytes of RAM.
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            Watermark::Relative(f) => (total as f64 * f) as u64,
            Watermark::Absolute(b) => b,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: vec![
                SocketAddr::from(([0, 0, 0, 0], 5672)),
                SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 5672)),
            ],
            data_dir: PathBuf::from("warren-data"),
            heartbeat: 60,
            frame_max: 131_072,
            channel_max: 2047,
            max_connections: 0,
            handshake_timeout: Duration::from_secs(10),
            default_user: "guest".into(),
            default_pass: "guest".into(),
            default_vhost: "/".into(),
            loopback_users: vec!["guest".into()],
            log: "info".into(),
            memory_high_watermark: Watermark::Relative(0.4),
            disk_free_limit: 50 * 1024 * 1024,
            memory_paging_ratio: 0.5,
            // RabbitMQ 3.10's default: 30 minutes.
            consumer_timeout: Some(Duration::from_millis(1_800_000)),
        }
    }
}

/// A value before validation: TOML gives typed values, env and flags give strings.
#[derive(Debug, Clone)]
pub enum RawValue {
    Str(String),
    Toml(toml::Value),
}

impl RawValue {
    fn display(&self) -> String {
        match self {
            RawValue::Str(s) => format!("'{s}'"),
            RawValue::Toml(v) => v.to_string(),
        }
    }
}

/// Keys that can be set, with the environment variables that set them (first wins).
pub const KEYS: &[(&str, &[&str])] = &[
    ("listen", &["WARREN_LISTEN"]),
    ("data_dir", &["WARREN_DATA_DIR"]),
    ("heartbeat", &["WARREN_HEARTBEAT"]),
    ("frame_max", &["WARREN_FRAME_MAX"]),
    ("channel_max", &["WARREN_CHANNEL_MAX"]),
    ("max_connections", &["WARREN_MAX_CONNECTIONS"]),
    ("handshake_timeout_ms", &["WARREN_HANDSHAKE_TIMEOUT_MS"]),
    (
        "default_user",
        &["WARREN_DEFAULT_USER", "RABBITMQ_DEFAULT_USER"],
    ),
    (
        "default_pass",
        &["WARREN_DEFAULT_PASS", "RABBITMQ_DEFAULT_PASS"],
    ),
    (
        "default_vhost",
        &["WARREN_DEFAULT_VHOST", "RABBITMQ_DEFAULT_VHOST"],
    ),
    ("loopback_users", &["WARREN_LOOPBACK_USERS"]),
    ("log", &["WARREN_LOG", "RUST_LOG"]),
    ("memory_high_watermark", &["WARREN_MEMORY_HIGH_WATERMARK"]),
    ("disk_free_limit", &["WARREN_DISK_FREE_LIMIT"]),
    ("memory_paging_ratio", &["WARREN_MEMORY_PAGING_RATIO"]),
    ("consumer_timeout", &["WARREN_CONSUMER_TIMEOUT"]),
];

impl Config {
    /// Builds the effective configuration: defaults, then `file`, then `env`, then `flags`.
    pub fn load(
        file: Option<&Path>,
        env: &BTreeMap<String, String>,
        flags: &[(&str, String)],
    ) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        if let Some(path) = file {
            config.apply_file(path)?;
        }
        for (key, vars) in KEYS {
            if let Some((var, value)) = vars
                .iter()
                .find_map(|v| env.get(*v).map(|value| (*v, value)))
            {
                config.set(
                    key,
                    RawValue::Str(value.clone()),
                    Origin::Env(var.to_string()),
                )?;
            }
        }
        for (key, value) in flags {
            let flag = format!("--{}", key.replace('_', "-"));
            config.set(key, RawValue::Str(value.clone()), Origin::Flag(flag))?;
        }
        Ok(config)
    }

    fn apply_file(&mut self, path: &Path) -> Result<(), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        self.apply_toml(&text, path)
    }

    /// Applies the keys of a TOML document; `path` is only used to name the origin.
    pub fn apply_toml(&mut self, text: &str, path: &Path) -> Result<(), ConfigError> {
        let table: toml::Table = text
            .parse()
            .map_err(|e: toml::de::Error| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.message().to_string(),
            })?;
        for (key, value) in table {
            self.set(
                &key,
                RawValue::Toml(value),
                Origin::File(path.to_path_buf()),
            )?;
        }
        Ok(())
    }

    /// Validates and applies one setting.
    pub fn set(&mut self, key: &str, value: RawValue, origin: Origin) -> Result<(), ConfigError> {
        let invalid = |reason: &str| ConfigError::Invalid {
            key: key.to_string(),
            value: value.display(),
            origin: origin.clone(),
            reason: reason.to_string(),
        };
        match key {
            "listen" => {
                let items = string_list(&value).ok_or_else(|| invalid("expected addresses"))?;
                let mut addrs = Vec::new();
                for item in items {
                    let addr = item.parse::<SocketAddr>().map_err(|_| {
                        invalid("expected host:port, e.g. 0.0.0.0:5672 or [::1]:5672")
                    })?;
                    addrs.push(addr);
                }
                if addrs.is_empty() {
                    return Err(invalid("at least one address is required"));
                }
                self.listen = addrs;
            }
            "data_dir" => {
                let s = string(&value).ok_or_else(|| invalid("expected a path"))?;
                if s.is_empty() {
                    return Err(invalid("must not be empty"));
                }
                self.data_dir = PathBuf::from(s);
            }
            "heartbeat" => {
                self.heartbeat = integer(&value, 0, u16::MAX as i64)
                    .map_err(|r| invalid(&r))?
                    .try_into()
                    .map_err(|_| invalid("out of range"))?;
            }
            "frame_max" => {
                let v = integer(&value, 4096, u32::MAX as i64).map_err(|r| invalid(&r))?;
                self.frame_max = u32::try_from(v).map_err(|_| invalid("out of range"))?;
            }
            "channel_max" => {
                let v = integer(&value, 1, u16::MAX as i64).map_err(|r| invalid(&r))?;
                self.channel_max = u16::try_from(v).map_err(|_| invalid("out of range"))?;
            }
            "max_connections" => {
                let v = integer(&value, 0, i64::MAX).map_err(|r| invalid(&r))?;
                self.max_connections = usize::try_from(v).map_err(|_| invalid("out of range"))?;
            }
            "handshake_timeout_ms" => {
                let v = integer(&value, 1, 3_600_000).map_err(|r| invalid(&r))?;
                self.handshake_timeout =
                    Duration::from_millis(u64::try_from(v).map_err(|_| invalid("out of range"))?);
            }
            "default_user" | "default_pass" | "default_vhost" | "log" => {
                let s = string(&value).ok_or_else(|| invalid("expected a string"))?;
                if s.is_empty() && key != "default_pass" {
                    return Err(invalid("must not be empty"));
                }
                match key {
                    "default_user" => self.default_user = s,
                    "default_pass" => self.default_pass = s,
                    "default_vhost" => self.default_vhost = s,
                    _ => self.log = s,
                }
            }
            "memory_high_watermark" => {
                let reason = "expected a fraction of RAM (0 < f <= 1, e.g. 0.4) or a byte count (e.g. 1073741824)";
                let number = match &value {
                    RawValue::Str(s) => s.trim().parse::<f64>().ok(),
                    RawValue::Toml(toml::Value::Float(f)) => Some(*f),
                    RawValue::Toml(toml::Value::Integer(i)) => Some(*i as f64),
                    RawValue::Toml(_) => None,
                }
                .ok_or_else(|| invalid(reason))?;
                self.memory_high_watermark = if number > 0.0 && number <= 1.0 {
                    Watermark::Relative(number)
                } else if number > 1.0 && number.fract() == 0.0 && number < u64::MAX as f64 {
                    Watermark::Absolute(number as u64)
                } else {
                    return Err(invalid(reason));
                };
            }
            "memory_paging_ratio" => {
                let ratio = match &value {
                    RawValue::Str(s) => s.trim().parse::<f64>().ok(),
                    RawValue::Toml(toml::Value::Float(f)) => Some(*f),
                    RawValue::Toml(toml::Value::Integer(i)) => Some(*i as f64),
                    RawValue::Toml(_) => None,
                }
                .filter(|r| *r > 0.0 && r.is_finite())
                .ok_or_else(|| {
                    invalid("expected a positive number, e.g. 0.5 (above 1: never page)")
                })?;
                self.memory_paging_ratio = ratio;
            }
            "consumer_timeout" => {
                let v = integer(&value, 0, i64::MAX)
                    .map_err(|r| invalid(&format!("{r} (milliseconds; 0 disables the timeout)")))?;
                let ms = u64::try_from(v).map_err(|_| invalid("out of range"))?;
                self.consumer_timeout = (ms > 0).then(|| Duration::from_millis(ms));
            }
            "disk_free_limit" => {
                let v = integer(&value, 0, i64::MAX).map_err(|r| invalid(&r))?;
                self.disk_free_limit = u64::try_from(v).map_err(|_| invalid("out of range"))?;
            }
            "loopback_users" => {
                self.loopback_users =
                    string_list(&value).ok_or_else(|| invalid("expected a list of user names"))?;
            }
            _ => {
                return Err(ConfigError::UnknownKey {
                    key: key.to_string(),
                    origin,
                })
            }
        }
        Ok(())
    }
}

fn string(value: &RawValue) -> Option<String> {
    match value {
        RawValue::Str(s) => Some(s.clone()),
        RawValue::Toml(toml::Value::String(s)) => Some(s.clone()),
        RawValue::Toml(_) => None,
    }
}

/// Env and flags give lists comma separated; TOML gives an array (or a single string).
fn string_list(value: &RawValue) -> Option<Vec<String>> {
    match value {
        RawValue::Str(s) => Some(
            s.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(String::from)
                .collect(),
        ),
        RawValue::Toml(toml::Value::String(s)) => Some(vec![s.clone()]),
        RawValue::Toml(toml::Value::Array(items)) => {
            items.iter().map(|v| v.as_str().map(String::from)).collect()
        }
        RawValue::Toml(_) => None,
    }
}

fn integer(value: &RawValue, min: i64, max: i64) -> Result<i64, String> {
    let v = match value {
        RawValue::Str(s) => s
            .trim()
            .parse::<i64>()
            .map_err(|_| "expected an integer".to_string())?,
        RawValue::Toml(toml::Value::Integer(i)) => *i,
        RawValue::Toml(_) => return Err("expected an integer".into()),
    };
    if v < min || v > max {
        return Err(format!("must be between {min} and {max}"));
    }
    Ok(v)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn defaults_match_rabbitmq() {
        let c = Config::default();
        assert_eq!(c.channel_max, 2047);
        assert_eq!(c.frame_max, 131_072);
        assert_eq!(c.heartbeat, 60);
        assert_eq!(c.handshake_timeout, Duration::from_secs(10));
        assert_eq!(c.loopback_users, vec!["guest".to_string()]);
    }

    #[test]
    fn layering_flag_beats_env_beats_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warren.toml");
        std::fs::write(&path, "heartbeat = 5\nchannel_max = 10\nframe_max = 8192\n").unwrap();
        let mut env = BTreeMap::new();
        env.insert("WARREN_CHANNEL_MAX".to_string(), "20".to_string());
        env.insert("WARREN_FRAME_MAX".to_string(), "9000".to_string());
        let flags = [("frame_max", "10000".to_string())];
        let c = Config::load(Some(&path), &env, &flags).unwrap();
        assert_eq!(c.heartbeat, 5);
        assert_eq!(c.channel_max, 20);
        assert_eq!(c.frame_max, 10000);
    }

    #[test]
    fn bad_file_value_names_key_and_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("warren.toml");
        std::fs::write(&path, "heartbeat = \"soon\"\n").unwrap();
        let err = Config::load(Some(&path), &BTreeMap::new(), &[]).unwrap_err();
        let text = err.to_string();
        assert!(text.contains("'heartbeat'"), "{text}");
        assert!(text.contains(&path.display().to_string()), "{text}");
    }

    #[test]
    fn bad_env_value_names_variable() {
        let mut env = BTreeMap::new();
        env.insert("WARREN_FRAME_MAX".to_string(), "12".to_string());
        let err = Config::load(None, &env, &[]).unwrap_err().to_string();
        assert!(err.contains("'frame_max'"), "{err}");
        assert!(err.contains("WARREN_FRAME_MAX"), "{err}");
        assert!(err.contains("between 4096"), "{err}");
    }

    #[test]
    fn consumer_timeout_in_milliseconds_zero_disables() {
        let load =
            |v: &str| Config::load(None, &BTreeMap::new(), &[("consumer_timeout", v.into())]);
        assert_eq!(
            Config::default().consumer_timeout,
            Some(Duration::from_secs(1800))
        );
        assert_eq!(
            load("1500").unwrap().consumer_timeout,
            Some(Duration::from_millis(1500))
        );
        assert_eq!(load("0").unwrap().consumer_timeout, None);
        let err = load("soon").unwrap_err().to_string();
        assert!(err.contains("'consumer_timeout'"), "{err}");
        assert!(err.contains("--consumer-timeout"), "{err}");
        let mut env = BTreeMap::new();
        env.insert("WARREN_CONSUMER_TIMEOUT".to_string(), "-5".to_string());
        let err = Config::load(None, &env, &[]).unwrap_err().to_string();
        assert!(err.contains("WARREN_CONSUMER_TIMEOUT"), "{err}");
    }

    #[test]
    fn memory_watermark_relative_or_absolute() {
        let c = Config::load(
            None,
            &BTreeMap::new(),
            &[("memory_high_watermark", "0.5".into())],
        )
        .unwrap();
        assert_eq!(c.memory_high_watermark, Watermark::Relative(0.5));
        assert_eq!(c.memory_high_watermark.bytes(1000), 500);
        let c = Config::load(
            None,
            &BTreeMap::new(),
            &[("memory_high_watermark", "104857600".into())],
        )
        .unwrap();
        assert_eq!(c.memory_high_watermark, Watermark::Absolute(104_857_600));
        let err = Config::load(
            None,
            &BTreeMap::new(),
            &[("memory_high_watermark", "-1".into())],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("memory_high_watermark"), "{err}");
    }

    #[test]
    fn unknown_key_is_rejected() {
        let mut c = Config::default();
        let err = c
            .apply_toml("hearbeat = 3\n", Path::new("/etc/warren.toml"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown key 'hearbeat'"), "{err}");
        assert!(err.contains("/etc/warren.toml"), "{err}");
    }

    #[test]
    fn listen_and_lists() {
        let mut env = BTreeMap::new();
        env.insert(
            "WARREN_LISTEN".to_string(),
            "127.0.0.1:5673, [::1]:5673".to_string(),
        );
        env.insert("RABBITMQ_DEFAULT_USER".to_string(), "admin".to_string());
        env.insert("WARREN_LOOPBACK_USERS".to_string(), "".to_string());
        let c = Config::load(None, &env, &[]).unwrap();
        assert_eq!(c.listen.len(), 2);
        assert_eq!(c.default_user, "admin");
        assert!(c.loopback_users.is_empty());
        let err = Config::load(None, &BTreeMap::new(), &[("listen", "nope".into())])
            .unwrap_err()
            .to_string();
        assert!(err.contains("--listen"), "{err}");
    }
}
