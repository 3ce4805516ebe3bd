//! Behaviour of the definitions store: durability per change, compaction, torn tails,
//! leftovers of a cut compaction, lossless arguments, real file system.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;

use amq_protocol_types::{AMQPValue, FieldTable, ShortString};
use warren_storage::{
    Backend, BindingDef, CrashMode, DefChange, Definitions, ExchangeDef, FsBackend, PermissionDef,
    QueueDef, SimBackend, StorageError, UserDef, VhostDef,
};

fn queue(v: &str, n: &str, ttl: i64) -> DefChange {
    let mut arguments = FieldTable::default();
    arguments.insert(
        ShortString::from("x-message-ttl"),
        AMQPValue::LongInt(ttl as i32),
    );
    DefChange::PutQueue(QueueDef {
        vhost: v.into(),
        name: n.into(),
        durable: true,
        auto_delete: false,
        arguments,
    })
}

fn basics() -> Vec<DefChange> {
    vec![
        DefChange::PutVhost(VhostDef {
            name: "/".into(),
            description: "default".into(),
            tags: vec![],
        }),
        DefChange::PutUser(UserDef {
            name: "guest".into(),
            password_hash: "abc".into(),
            hashing_algorithm: "rabbit_password_hashing_sha256".into(),
            tags: vec!["administrator".into()],
        }),
        DefChange::PutPermission(PermissionDef {
            user: "guest".into(),
            vhost: "/".into(),
            configure: ".*".into(),
            write: ".*".into(),
            read: ".*".into(),
        }),
        DefChange::PutExchange(ExchangeDef {
            vhost: "/".into(),
            name: "logs".into(),
            kind: "topic".into(),
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: FieldTable::default(),
        }),
        queue("/", "q1", 1000),
        DefChange::PutBinding(BindingDef {
            vhost: "/".into(),
            source: "logs".into(),
            destination: "q1".into(),
            destination_is_queue: true,
            routing_key: "#".into(),
            arguments: FieldTable::default(),
        }),
    ]
}

#[test]
fn changes_are_durable_on_return() {
    let disk = SimBackend::new();
    let mut d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    d.apply_all(&basics()).unwrap();
    d.apply(queue("/", "q2", 5)).unwrap();
    let state = d.state().clone();
    drop(d);
    let disk = disk.crash(CrashMode::LoseUnsynced);
    let d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    assert_eq!(d.state(), &state);
    assert_eq!(d.state().queues.len(), 2);
    assert_eq!(d.state().bindings().count(), 1);
}

#[test]
fn arguments_are_lossless() {
    let disk = SimBackend::new();
    let mut d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    let mut arguments = FieldTable::default();
    // NaN cannot be a JSON number; the integer widths would blur as JSON numbers.
    arguments.insert(ShortString::from("x-nan"), AMQPValue::Float(f32::NAN));
    arguments.insert(ShortString::from("x-u8"), AMQPValue::ShortShortUInt(200));
    arguments.insert(ShortString::from("x-i64"), AMQPValue::LongLongInt(i64::MIN));
    d.apply(DefChange::PutQueue(QueueDef {
        vhost: "/".into(),
        name: "q".into(),
        durable: true,
        auto_delete: false,
        arguments,
    }))
    .unwrap();
    drop(d);
    let d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    let t = d.state().queues[&("/".to_string(), "q".to_string())]
        .arguments
        .inner();
    assert!(matches!(t.get(&ShortString::from("x-nan")), Some(AMQPValue::Float(f)) if f.is_nan()));
    assert_eq!(
        t.get(&ShortString::from("x-u8")),
        Some(&AMQPValue::ShortShortUInt(200))
    );
    assert_eq!(
        t.get(&ShortString::from("x-i64")),
        Some(&AMQPValue::LongLongInt(i64::MIN))
    );
}

#[test]
fn vhost_delete_cascades_and_survives_reopen() {
    let disk = SimBackend::new();
    let mut d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    d.apply_all(&basics()).unwrap();
    d.apply(DefChange::DeleteVhost { name: "/".into() })
        .unwrap();
    drop(d);
    let d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    let s = d.state();
    assert!(s.vhosts.is_empty() && s.queues.is_empty() && s.exchanges.is_empty());
    assert!(s.permissions.is_empty() && s.bindings().next().is_none());
    assert_eq!(s.users.len(), 1);
}

#[test]
fn torn_tail_and_compaction_leftovers() {
    let disk = SimBackend::new();
    let mut d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    d.apply_all(&basics()).unwrap();
    let state = d.state().clone();
    drop(d);
    let log = Path::new("/defs/definitions.log");
    let f = disk.open_file(log).unwrap();
    let len = f.size().unwrap();
    // Half a record at the end, and a stale temporary file from a cut compaction.
    f.write_all_at(&[200, 0, 0, 0, 1, 2, 3], len).unwrap();
    f.sync().unwrap();
    disk.create_file(Path::new("/defs/definitions.log.tmp"))
        .unwrap();
    let d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    assert_eq!(d.state(), &state);
    let mut names = disk.list_dir(Path::new("/defs")).unwrap();
    names.sort();
    assert_eq!(names, vec!["definitions.log".to_string()]);
    assert_eq!(
        disk.file_contents(log).unwrap().len() as u64,
        len,
        "compacted, tail gone"
    );
}

#[test]
fn log_is_compacted_when_it_grows() {
    let disk = SimBackend::new();
    let mut d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    for i in 0..10_000 {
        d.apply(queue("/", "churn", i)).unwrap();
    }
    let size = disk
        .file_contents(Path::new("/defs/definitions.log"))
        .unwrap()
        .len();
    assert!(size < 2 << 20, "log not compacted: {size} bytes");
    assert_eq!(d.state().queues.len(), 1);
}

#[test]
fn undecodable_record_is_an_error_not_silently_dropped() {
    let disk = SimBackend::new();
    let mut d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    d.apply_all(&basics()).unwrap();
    drop(d);
    // A well-framed record whose JSON we do not understand (as a newer build might write).
    let f = disk.open_file(Path::new("/defs/definitions.log")).unwrap();
    let payload = br#"{"op":"put_policy","name":"p"}"#;
    let len = payload.len() as u32;
    let mut crc = crc32c::crc32c(&len.to_le_bytes());
    crc = crc32c::crc32c_append(crc, payload);
    let mut rec = len.to_le_bytes().to_vec();
    rec.extend_from_slice(&crc.to_le_bytes());
    rec.extend_from_slice(payload);
    f.write_all_at(&rec, f.size().unwrap()).unwrap();
    assert!(matches!(
        Definitions::open(disk.shared(), Path::new("/defs")),
        Err(StorageError::Definition { .. })
    ));
}

#[test]
fn failed_write_poisons_until_reopened() {
    let disk = SimBackend::new();
    let mut d = Definitions::open(disk.shared(), Path::new("/defs")).unwrap();
    disk.fail_after(1); // the write succeeds, the fsync fails
    assert!(matches!(
        d.apply(queue("/", "q", 1)),
        Err(StorageError::Io { .. })
    ));
    assert!(matches!(
        d.apply(queue("/", "q", 2)),
        Err(StorageError::Poisoned)
    ));
}

#[test]
fn real_file_system() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = FsBackend::shared();
    let mut d = Definitions::open(fs.clone(), tmp.path()).unwrap();
    d.apply_all(&basics()).unwrap();
    let state = d.state().clone();
    drop(d);
    let d = Definitions::open(fs, tmp.path()).unwrap();
    assert_eq!(d.state(), &state);
    let text = std::fs::read(tmp.path().join("definitions.log")).unwrap();
    assert!(
        text.windows(9).any(|w| w == b"put_queue"),
        "JSON payloads are greppable"
    );
}
