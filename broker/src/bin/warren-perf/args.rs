//! Command-line flags (named as RabbitMQ's PerfTest names them) and the validated [`Plan`]
//! they turn into. Everything here is pure, so it is unit-tested below.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{ArgAction, Parser};

pub const DEFAULT_URI: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// warren-perf: a PerfTest-like AMQP 0-9-1 load generator built on Warren's own codec.
///
/// Producers publish messages whose body starts with an 8-byte send timestamp; consumers read
/// it back for end-to-end latency. One progress line per second goes to stderr and one JSON
/// line with the totals to stdout.
#[derive(Debug, Parser)]
#[command(name = "warren-perf", disable_help_flag = true)]
pub struct Args {
    /// Print help.
    #[arg(long, action = ArgAction::Help)]
    help: Option<bool>,
    /// Broker URI (amqp://user:pass@host:port/vhost).
    #[arg(short = 'h', long = "uri", default_value = DEFAULT_URI)]
    pub uri: String,
    /// Number of producers (one connection each).
    #[arg(short = 'x', long = "producers", default_value_t = 1)]
    pub producers: usize,
    /// Number of consumers (one connection each).
    #[arg(short = 'y', long = "consumers", default_value_t = 1)]
    pub consumers: usize,
    /// Message body size in bytes; the first 8 hold the send timestamp.
    #[arg(short = 's', long = "size", default_value_t = 12)]
    pub size: usize,
    /// Queue name (the prefix of the names with --queue-count).
    #[arg(short = 'u', long = "queue", default_value = "warren-perf")]
    pub queue: String,
    /// Number of queues, named QUEUE-1..QUEUE-N; producers and consumers are spread over them.
    #[arg(long = "queue-count")]
    pub queue_count: Option<usize>,
    /// Queue name pattern with one %d, e.g. 'perf-test-%d' (PerfTest's --queue-pattern).
    #[arg(long = "queue-pattern")]
    pub queue_pattern: Option<String>,
    /// First number of --queue-pattern.
    #[arg(long = "queue-pattern-from", default_value_t = 1)]
    pub queue_pattern_from: usize,
    /// Last number of --queue-pattern (inclusive).
    #[arg(long = "queue-pattern-to")]
    pub queue_pattern_to: Option<usize>,
    /// Exchange name; "" publishes to the default exchange (no bindings declared).
    #[arg(short = 'e', long = "exchange", default_value = "direct")]
    pub exchange: String,
    /// Exchange type.
    #[arg(short = 't', long = "type", default_value = "direct")]
    pub exchange_type: String,
    /// Routing key (default: the name of the producer's queue).
    #[arg(short = 'k', long = "routing-key")]
    pub routing_key: Option<String>,
    /// Message flags: persistent, mandatory (repeatable or comma separated).
    #[arg(short = 'f', long = "flag")]
    pub flags: Vec<String>,
    /// Shorthand for --flag persistent: durable queues and persistent messages.
    #[arg(short = 'p', long = "persistent")]
    pub persistent: bool,
    /// Publisher confirms with at most N unconfirmed messages per producer.
    #[arg(short = 'c', long = "confirm")]
    pub confirm: Option<u64>,
    /// Consumer prefetch (basic.qos); 0 = unlimited.
    #[arg(short = 'q', long = "qos", default_value_t = 0)]
    pub qos: u16,
    /// Consumers use auto-ack (no-ack).
    #[arg(short = 'a', long = "autoack")]
    pub autoack: bool,
    /// Ack with multiple=true every N messages (0 or 1: ack each message).
    #[arg(short = 'A', long = "multi-ack-every", default_value_t = 0)]
    pub multi_ack_every: u64,
    /// Publishing rate limit per producer, messages per second (0 = unlimited).
    #[arg(short = 'r', long = "rate", default_value_t = 0.0)]
    pub rate: f64,
    /// Run time in seconds.
    #[arg(short = 'z', long = "time")]
    pub time: Option<f64>,
    /// Messages per producer, then it stops (after its confirms, with -c).
    #[arg(short = 'C', long = "pmessages")]
    pub pmessages: Option<u64>,
    /// Messages per consumer, then it stops.
    #[arg(short = 'D', long = "cmessages")]
    pub cmessages: Option<u64>,
    /// Queue arguments key=value (comma separated or repeated); numbers become longs,
    /// true/false booleans, anything else a string.
    #[arg(long = "queue-args", alias = "qa")]
    pub queue_args: Vec<String>,
    /// Declare queues auto-delete (PerfTest's default, true).
    #[arg(long = "auto-delete", default_value_t = true, action = ArgAction::Set)]
    pub auto_delete: bool,
    /// Largest frame to ask for in tune-ok (0: take the broker's offer).
    #[arg(short = 'M', long = "framemax", default_value_t = 0)]
    pub frame_max: u32,
    /// Heartbeat to ask for in tune-ok, seconds (0: none).
    #[arg(short = 'b', long = "heartbeat", default_value_t = 0)]
    pub heartbeat: u16,
    /// Progress report interval in seconds.
    #[arg(short = 'i', long = "interval", default_value_t = 1.0)]
    pub interval: f64,
    /// Name of the run, echoed as "scenario" in the JSON line.
    #[arg(long = "id", alias = "scenario", default_value = "")]
    pub id: String,
    /// Progress lines as JSON too (the final line on stdout is always JSON).
    #[arg(long = "json")]
    pub json: bool,
    /// Producer write batch: encode up to this many bytes per write call.
    #[arg(long = "batch-bytes", default_value_t = 256 * 1024)]
    pub batch_bytes: usize,
    /// With -C and no -D: consumers stop once producers are done and nothing arrived for
    /// this many seconds.
    #[arg(long = "idle-grace", default_value_t = 1.0)]
    pub idle_grace: f64,
    /// Consumers stop once nothing has arrived for this many seconds (e.g. a drain that
    /// stalls); off by default.
    #[arg(long = "idle-stop")]
    pub idle_stop: Option<f64>,
    /// With -C and -c: how long to wait for the last confirms, seconds.
    #[arg(long = "confirm-timeout", default_value_t = 60.0)]
    pub confirm_timeout: f64,
    /// Do not declare exchanges, queues or bindings (they exist already).
    #[arg(long = "predeclared")]
    pub predeclared: bool,
    /// Instead of a load run: poll the queue (-u) with passive declares until it holds at least
    /// N messages (connection refusals are retried), print a JSON line, exit.
    #[arg(long = "wait-queue-messages")]
    pub wait_queue_messages: Option<u64>,
    /// Give up on --wait-queue-messages after this many seconds.
    #[arg(long = "wait-timeout", default_value_t = 120.0)]
    pub wait_timeout: f64,
    /// With --wait-queue-messages: give up when the broker answers but the queue has been
    /// missing for this many seconds.
    #[arg(long = "absent-grace", default_value_t = 5.0)]
    pub absent_grace: f64,
    /// Producers pause while more than N messages are published but not yet consumed (a
    /// fanout message counts once per queue). A safety net against unbounded queues when
    /// producers outrun consumers; off by default, as in PerfTest.
    #[arg(long = "max-backlog")]
    pub max_backlog: Option<u64>,
    /// Runtime worker threads (0: one per core).
    #[arg(long = "threads", default_value_t = 0)]
    pub threads: usize,
}

/// A broker address parsed from an amqp:// URI.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uri {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub pass: String,
    pub vhost: String,
}

/// A queue argument value.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    Long(i64),
    Bool(bool),
    Str(String),
}

/// Everything a run needs, validated.
#[derive(Debug, Clone)]
pub struct Plan {
    pub uri: Uri,
    pub id: String,
    pub producers: usize,
    pub consumers: usize,
    pub size: usize,
    pub queues: Vec<String>,
    pub exchange: String,
    pub exchange_type: String,
    pub routing_key: Option<String>,
    pub persistent: bool,
    pub mandatory: bool,
    pub confirm: Option<u64>,
    pub qos: u16,
    pub autoack: bool,
    pub multi_ack_every: u64,
    pub rate: Option<f64>,
    pub time: Option<Duration>,
    pub pmessages: Option<u64>,
    pub cmessages: Option<u64>,
    pub queue_args: Vec<(String, ArgValue)>,
    pub auto_delete: bool,
    pub frame_max: u32,
    pub heartbeat: u16,
    pub interval: Duration,
    pub json: bool,
    pub batch_bytes: usize,
    pub idle_grace: Duration,
    pub idle_stop: Option<Duration>,
    pub confirm_timeout: Duration,
    pub predeclared: bool,
    pub wait_queue_messages: Option<u64>,
    pub wait_timeout: Duration,
    pub absent_grace: Duration,
    pub max_backlog: Option<u64>,
    pub threads: usize,
}

impl Plan {
    /// The queue producer `i` publishes to (its routing key unless -k is given).
    pub fn producer_queue(&self, i: usize) -> &str {
        self.queues
            .get(i % self.queues.len().max(1))
            .map_or("", String::as_str)
    }

    /// The queue consumer `j` consumes from.
    pub fn consumer_queue(&self, j: usize) -> &str {
        self.producer_queue(j)
    }

    pub fn routing_key(&self, producer: usize) -> String {
        match &self.routing_key {
            Some(k) => k.clone(),
            None => self.producer_queue(producer).to_owned(),
        }
    }

    /// How many queues one published message lands in (for --max-backlog).
    pub fn copies_per_message(&self) -> u64 {
        if self.exchange_type == "fanout" && !self.exchange.is_empty() {
            self.queues.len().max(1) as u64
        } else {
            1
        }
    }

    /// True when the exchange must be declared (not the default one, not a built-in amq.*).
    pub fn declares_exchange(&self) -> bool {
        !self.predeclared && !self.exchange.is_empty() && !self.exchange.starts_with("amq.")
    }
}

fn seconds(what: &str, s: f64) -> Result<Duration> {
    Duration::try_from_secs_f64(s).with_context(|| format!("{what}: bad number of seconds {s}"))
}

impl TryFrom<Args> for Plan {
    type Error = anyhow::Error;

    fn try_from(a: Args) -> Result<Plan> {
        let uri = parse_uri(&a.uri)?;
        let queues = queue_names(
            &a.queue,
            a.queue_count,
            a.queue_pattern.as_deref(),
            a.queue_pattern_from,
            a.queue_pattern_to,
        )?;
        let mut persistent = a.persistent;
        let mut mandatory = false;
        for flag in a.flags.iter().flat_map(|f| f.split(',')) {
            match flag.trim() {
                "persistent" => persistent = true,
                "mandatory" => mandatory = true,
                "" => {}
                other => bail!("unknown --flag '{other}' (want persistent or mandatory)"),
            }
        }
        let mut queue_args = Vec::new();
        for spec in &a.queue_args {
            queue_args.extend(parse_queue_args(spec)?);
        }
        if a.confirm == Some(0) {
            bail!("--confirm needs a window of at least 1");
        }
        if !a.autoack && a.qos > 0 && a.multi_ack_every > u64::from(a.qos) {
            bail!(
                "--multi-ack-every {} exceeds --qos {}: consumers would wait forever",
                a.multi_ack_every,
                a.qos
            );
        }
        if !(a.rate.is_finite() && a.rate >= 0.0) {
            bail!("--rate must be a non-negative number");
        }
        if a.interval <= 0.0 {
            bail!("--interval must be positive");
        }
        Ok(Plan {
            uri,
            id: a.id,
            producers: a.producers,
            consumers: a.consumers,
            size: a.size,
            queues,
            exchange: a.exchange,
            exchange_type: a.exchange_type,
            routing_key: a.routing_key,
            persistent,
            mandatory,
            confirm: a.confirm,
            qos: a.qos,
            autoack: a.autoack,
            multi_ack_every: a.multi_ack_every,
            rate: (a.rate > 0.0).then_some(a.rate),
            time: a.time.map(|t| seconds("--time", t)).transpose()?,
            pmessages: a.pmessages,
            cmessages: a.cmessages,
            queue_args,
            auto_delete: a.auto_delete,
            frame_max: a.frame_max,
            heartbeat: a.heartbeat,
            interval: seconds("--interval", a.interval)?,
            json: a.json,
            batch_bytes: a.batch_bytes.max(1),
            idle_grace: seconds("--idle-grace", a.idle_grace)?,
            idle_stop: a.idle_stop.map(|s| seconds("--idle-stop", s)).transpose()?,
            confirm_timeout: seconds("--confirm-timeout", a.confirm_timeout)?,
            predeclared: a.predeclared,
            wait_queue_messages: a.wait_queue_messages,
            wait_timeout: seconds("--wait-timeout", a.wait_timeout)?,
            absent_grace: seconds("--absent-grace", a.absent_grace)?,
            max_backlog: a.max_backlog,
            threads: a.threads,
        })
    }
}

/// Queue names from -u, --queue-count or --queue-pattern.
pub fn queue_names(
    queue: &str,
    count: Option<usize>,
    pattern: Option<&str>,
    from: usize,
    to: Option<usize>,
) -> Result<Vec<String>> {
    if let Some(pattern) = pattern {
        if pattern.matches("%d").count() != 1 {
            bail!("--queue-pattern needs exactly one %d, got '{pattern}'");
        }
        let to = match (to, count) {
            (Some(to), _) => to,
            (None, Some(n)) => from + n.saturating_sub(1),
            (None, None) => bail!("--queue-pattern needs --queue-pattern-to or --queue-count"),
        };
        if to < from {
            bail!("--queue-pattern-to {to} is below --queue-pattern-from {from}");
        }
        return Ok((from..=to)
            .map(|i| pattern.replace("%d", &i.to_string()))
            .collect());
    }
    match count {
        None | Some(1) => Ok(vec![queue.to_owned()]),
        Some(0) => bail!("--queue-count must be at least 1"),
        Some(n) => Ok((1..=n).map(|i| format!("{queue}-{i}")).collect()),
    }
}

/// `key=value[,key=value...]`, PerfTest's --queue-args syntax.
pub fn parse_queue_args(spec: &str) -> Result<Vec<(String, ArgValue)>> {
    let mut out = Vec::new();
    for pair in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let Some((key, value)) = pair.split_once('=') else {
            bail!("queue argument '{pair}' is not key=value");
        };
        let key = key.trim();
        if key.is_empty() {
            bail!("queue argument '{pair}' has an empty key");
        }
        let value = value.trim();
        let value = if let Ok(n) = value.parse::<i64>() {
            ArgValue::Long(n)
        } else if value == "true" || value == "false" {
            ArgValue::Bool(value == "true")
        } else {
            ArgValue::Str(value.to_owned())
        };
        out.push((key.to_owned(), value));
    }
    Ok(out)
}

fn percent_decode(s: &str) -> Result<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        if b == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .with_context(|| format!("bad percent escape in '{s}'"))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(b);
            i += 1;
        }
    }
    String::from_utf8(out).with_context(|| format!("'{s}' is not UTF-8 once decoded"))
}

/// `amqp://[user[:pass]@]host[:port][/vhost][?query]`. No path or "/" means vhost "/";
/// the query is ignored.
pub fn parse_uri(uri: &str) -> Result<Uri> {
    let Some(rest) = uri.strip_prefix("amqp://") else {
        bail!("URI '{uri}' must start with amqp:// (amqps is not supported)");
    };
    let rest = rest.split_once('?').map_or(rest, |(r, _)| r);
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let (userinfo, hostport) = match authority.rsplit_once('@') {
        Some((u, h)) => (Some(u), h),
        None => (None, authority),
    };
    let (user, pass) = match userinfo {
        None => ("guest".to_owned(), "guest".to_owned()),
        Some(u) => match u.split_once(':') {
            Some((user, pass)) => (percent_decode(user)?, percent_decode(pass)?),
            None => (percent_decode(u)?, String::new()),
        },
    };
    let (host, port) = if let Some(v6) = hostport.strip_prefix('[') {
        let (host, after) = v6
            .split_once(']')
            .with_context(|| format!("unclosed '[' in URI '{uri}'"))?;
        (host, after.strip_prefix(':'))
    } else {
        match hostport.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (hostport, None),
        }
    };
    let port = match port {
        None | Some("") => 5672,
        Some(p) => p
            .parse::<u16>()
            .with_context(|| format!("bad port '{p}' in URI '{uri}'"))?,
    };
    let host = if host.is_empty() { "localhost" } else { host };
    let vhost = if path.is_empty() {
        "/".to_owned()
    } else {
        percent_decode(path)?
    };
    Ok(Uri {
        host: host.to_owned(),
        port,
        user,
        pass,
        vhost,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn plan(args: &[&str]) -> Result<Plan> {
        let mut v = vec!["warren-perf"];
        v.extend_from_slice(args);
        Plan::try_from(Args::try_parse_from(v)?)
    }

    #[test]
    fn perftest_short_flags() {
        let p = plan(&[
            "-h",
            "amqp://u:p@10.0.0.1:5700/vh",
            "-x",
            "2",
            "-y",
            "3",
            "-s",
            "1024",
            "-u",
            "q",
            "-e",
            "ex",
            "-t",
            "fanout",
            "-f",
            "persistent",
            "-c",
            "1000",
            "-q",
            "500",
            "-A",
            "100",
            "-r",
            "1000",
            "-z",
            "2.5",
            "-C",
            "10",
            "-D",
            "20",
            "--queue-args",
            "x-max-length=5,x-queue-type=classic",
            "--id",
            "c",
        ])
        .unwrap();
        assert_eq!(p.uri.host, "10.0.0.1");
        assert_eq!(p.uri.port, 5700);
        assert_eq!((p.uri.user.as_str(), p.uri.pass.as_str()), ("u", "p"));
        assert_eq!(p.uri.vhost, "vh");
        assert_eq!((p.producers, p.consumers, p.size), (2, 3, 1024));
        assert_eq!(p.queues, vec!["q"]);
        assert_eq!(
            (p.exchange.as_str(), p.exchange_type.as_str()),
            ("ex", "fanout")
        );
        assert!(p.persistent && !p.mandatory);
        assert_eq!(p.confirm, Some(1000));
        assert_eq!((p.qos, p.multi_ack_every, p.autoack), (500, 100, false));
        assert_eq!(p.rate, Some(1000.0));
        assert_eq!(p.time, Some(Duration::from_millis(2500)));
        assert_eq!((p.pmessages, p.cmessages), (Some(10), Some(20)));
        assert_eq!(
            p.queue_args,
            vec![
                ("x-max-length".to_owned(), ArgValue::Long(5)),
                ("x-queue-type".to_owned(), ArgValue::Str("classic".into()))
            ]
        );
        assert_eq!(p.id, "c");
        assert!(p.auto_delete);
    }

    #[test]
    fn defaults_and_long_names() {
        let p = plan(&[]).unwrap();
        assert_eq!(p.uri, parse_uri(DEFAULT_URI).unwrap());
        assert_eq!(p.uri.vhost, "/");
        assert_eq!((p.producers, p.consumers), (1, 1));
        assert_eq!(p.rate, None);
        assert_eq!(p.confirm, None);
        assert!(!p.persistent);
        let p = plan(&[
            "--uri",
            "amqp://127.0.0.1",
            "--producers",
            "0",
            "--autoack",
            "--persistent",
            "--flag",
            "mandatory",
            "--auto-delete",
            "false",
            "--rate",
            "0",
        ])
        .unwrap();
        assert_eq!(p.producers, 0);
        assert!(p.autoack && p.persistent && p.mandatory && !p.auto_delete);
        assert_eq!(p.rate, None);
        assert_eq!(p.uri.user, "guest");
    }

    #[test]
    fn bad_combinations_are_refused() {
        assert!(plan(&["-q", "10", "-A", "100"]).is_err());
        // With auto-ack there is nothing to ack, so the combination is harmless.
        assert!(plan(&["-q", "10", "-A", "100", "-a"]).is_ok());
        assert!(plan(&["-c", "0"]).is_err());
        assert!(plan(&["-f", "fast"]).is_err());
        assert!(plan(&["-r", "-5"]).is_err());
        assert!(plan(&["--queue-args", "novalue"]).is_err());
        assert!(plan(&["-h", "http://x"]).is_err());
    }

    #[test]
    fn queue_count_and_pattern() {
        let p = plan(&["-u", "q", "--queue-count", "3", "-x", "4", "-y", "5"]).unwrap();
        assert_eq!(p.queues, vec!["q-1", "q-2", "q-3"]);
        let by_producer: Vec<_> = (0..4).map(|i| p.routing_key(i)).collect();
        assert_eq!(by_producer, vec!["q-1", "q-2", "q-3", "q-1"]);
        assert_eq!(p.consumer_queue(4), "q-2");
        let p = plan(&["--queue-pattern", "perf-%d", "--queue-pattern-to", "2"]).unwrap();
        assert_eq!(p.queues, vec!["perf-1", "perf-2"]);
        let p = plan(&[
            "--queue-pattern",
            "p%d",
            "--queue-pattern-from",
            "5",
            "--queue-count",
            "2",
        ])
        .unwrap();
        assert_eq!(p.queues, vec!["p5", "p6"]);
        assert!(plan(&["--queue-pattern", "nopct", "--queue-pattern-to", "2"]).is_err());
        assert!(plan(&["--queue-count", "0"]).is_err());
        let p = plan(&["-k", "fixed", "--queue-count", "2"]).unwrap();
        assert_eq!(p.routing_key(1), "fixed");
    }

    #[test]
    fn queue_args_types() {
        assert_eq!(
            parse_queue_args("a=1, b=true,c=x=y,").unwrap(),
            vec![
                ("a".to_owned(), ArgValue::Long(1)),
                ("b".to_owned(), ArgValue::Bool(true)),
                ("c".to_owned(), ArgValue::Str("x=y".into())),
            ]
        );
        assert!(parse_queue_args("=1").is_err());
    }

    #[test]
    fn uris() {
        let u = parse_uri("amqp://guest:guest@127.0.0.1:5672/%2f").unwrap();
        assert_eq!(u.vhost, "/");
        let u = parse_uri("amqp://a%40b:p%3Aw@[::1]:5673/my%2Fvh?heartbeat=5").unwrap();
        assert_eq!(
            u,
            Uri {
                host: "::1".into(),
                port: 5673,
                user: "a@b".into(),
                pass: "p:w".into(),
                vhost: "my/vh".into(),
            }
        );
        let u = parse_uri("amqp://localhost/").unwrap();
        assert_eq!((u.port, u.vhost.as_str()), (5672, "/"));
        assert!(parse_uri("amqp://h:notaport/").is_err());
        assert!(parse_uri("amqp://h/%zz").is_err());
    }
}
