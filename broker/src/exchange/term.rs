//! Field-table values seen the way RabbitMQ's Erlang code sees them: its type names, its `==`
//! and `=:=` comparisons, and how `~p` / `~s` print them in reply texts.
//!
//! RabbitMQ parses a field value into an Erlang term (`rabbit_binary_parser`) and the headers
//! exchange and equivalence checks then compare those terms. Copying that view here is what makes
//! `{signedint, 1}` match `{long, 1}` and `{double, 1.0}` (all numbers under `==`) while
//! `{longstr, <<"1">>}` does not.

use amq_protocol::types::{AMQPValue, FieldArray, FieldTable};

/// RabbitMQ's type atom for a value (`rabbit_binary_parser`), as used in reply texts.
pub fn type_name(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::Boolean(_) => "bool",
        AMQPValue::ShortShortInt(_) => "byte",
        AMQPValue::ShortShortUInt(_) => "unsignedbyte",
        AMQPValue::ShortInt(_) => "short",
        AMQPValue::ShortUInt(_) => "unsignedshort",
        AMQPValue::LongInt(_) => "signedint",
        AMQPValue::LongUInt(_) => "unsignedint",
        AMQPValue::LongLongInt(_) => "long",
        AMQPValue::Float(_) => "float",
        AMQPValue::Double(_) => "double",
        AMQPValue::DecimalValue(_) => "decimal",
        // RabbitMQ has no short-string field type ('s' is a short int); the only way to get
        // one is from our own code, and it is a string like any longstr.
        AMQPValue::ShortString(_) | AMQPValue::LongString(_) => "longstr",
        AMQPValue::FieldArray(_) => "array",
        AMQPValue::Timestamp(_) => "timestamp",
        AMQPValue::FieldTable(_) => "table",
        AMQPValue::ByteArray(_) => "binary",
        AMQPValue::Void => "void",
    }
}

/// `rabbit_misc:type_class/1`: the numeric types collapse into `int` and `float`.
pub fn type_class(value: &AMQPValue) -> &'static str {
    match value {
        AMQPValue::ShortShortInt(_)
        | AMQPValue::ShortShortUInt(_)
        | AMQPValue::ShortInt(_)
        | AMQPValue::ShortUInt(_)
        | AMQPValue::LongInt(_)
        | AMQPValue::LongUInt(_)
        | AMQPValue::LongLongInt(_)
        | AMQPValue::DecimalValue(_) => "int",
        AMQPValue::Float(_) | AMQPValue::Double(_) => "float",
        other => type_name(other),
    }
}

/// The Erlang term a value is parsed into, borrowed from the value.
enum Term<'a> {
    Int(i128),
    Float(f64),
    Binary(&'a [u8]),
    Atom(&'static str),
    /// `{Scale, Value}`
    Decimal(u8, u32),
    /// `[{Key, Type, Value}]`, in wire order (a `FieldTable` is sorted, as RabbitMQ sorts
    /// binding arguments and headers before comparing them).
    Table(&'a FieldTable),
    /// `[{Type, Value}]`
    Array(&'a FieldArray),
}

fn term(value: &AMQPValue) -> Term<'_> {
    match value {
        AMQPValue::Boolean(b) => Term::Atom(if *b { "true" } else { "false" }),
        AMQPValue::ShortShortInt(v) => Term::Int(i128::from(*v)),
        AMQPValue::ShortShortUInt(v) => Term::Int(i128::from(*v)),
        AMQPValue::ShortInt(v) => Term::Int(i128::from(*v)),
        AMQPValue::ShortUInt(v) => Term::Int(i128::from(*v)),
        AMQPValue::LongInt(v) => Term::Int(i128::from(*v)),
        AMQPValue::LongUInt(v) => Term::Int(i128::from(*v)),
        AMQPValue::LongLongInt(v) => Term::Int(i128::from(*v)),
        AMQPValue::Timestamp(v) => Term::Int(i128::from(*v)),
        AMQPValue::Float(v) => Term::Float(f64::from(*v)),
        AMQPValue::Double(v) => Term::Float(*v),
        AMQPValue::DecimalValue(d) => Term::Decimal(d.scale, d.value),
        AMQPValue::ShortString(s) => Term::Binary(s.as_str().as_bytes()),
        AMQPValue::LongString(s) => Term::Binary(s.as_bytes()),
        AMQPValue::ByteArray(b) => Term::Binary(b.as_slice()),
        AMQPValue::FieldTable(t) => Term::Table(t),
        AMQPValue::FieldArray(a) => Term::Array(a),
        AMQPValue::Void => Term::Atom("undefined"),
    }
}

/// How strictly two terms are compared.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Equality {
    /// Erlang `==`.
    Loose,
    /// Erlang `=:=`.
    Exact,
    /// Same type and same bits: the identity of a stored binding's arguments.
    Identical,
}

/// Erlang `==`: numbers compare by value across integer and float types, everything else
/// must be the same term. Used for header values (`rabbit_exchange_type_headers`).
pub fn loose_eq(a: &AMQPValue, b: &AMQPValue) -> bool {
    terms_eq(&term(a), &term(b), Equality::Loose)
}

/// Erlang `=:=` (a pattern match on two equal variables): like [`loose_eq`] but an integer
/// never equals a float.
pub fn exact_eq(a: &AMQPValue, b: &AMQPValue) -> bool {
    terms_eq(&term(a), &term(b), Equality::Exact)
}

/// Whether two argument tables are the same binding arguments: same keys, and per key the
/// same type and value. Floats compare by bits so that a NaN argument can still be unbound.
pub fn same_table(a: &FieldTable, b: &FieldTable) -> bool {
    a.inner().len() == b.inner().len()
        && a.inner()
            .iter()
            .zip(b.inner().iter())
            .all(|((k1, v1), (k2, v2))| k1 == k2 && typed_eq(v1, v2, Equality::Identical))
}

fn terms_eq(a: &Term<'_>, b: &Term<'_>, eq: Equality) -> bool {
    match (a, b) {
        (Term::Int(x), Term::Int(y)) => x == y,
        (Term::Float(x), Term::Float(y)) => match eq {
            Equality::Identical => x.to_bits() == y.to_bits(),
            Equality::Loose | Equality::Exact => x == y,
        },
        (Term::Int(i), Term::Float(f)) | (Term::Float(f), Term::Int(i)) => {
            eq == Equality::Loose && int_equals_float(*i, *f)
        }
        (Term::Binary(x), Term::Binary(y)) => x == y,
        (Term::Atom(x), Term::Atom(y)) => x == y,
        (Term::Decimal(s1, v1), Term::Decimal(s2, v2)) => s1 == s2 && v1 == v2,
        (Term::Table(x), Term::Table(y)) => {
            x.inner().len() == y.inner().len()
                && x.inner()
                    .iter()
                    .zip(y.inner().iter())
                    .all(|((k1, v1), (k2, v2))| k1 == k2 && typed_eq(v1, v2, eq))
        }
        (Term::Array(x), Term::Array(y)) => {
            x.as_slice().len() == y.as_slice().len()
                && x.as_slice()
                    .iter()
                    .zip(y.as_slice().iter())
                    .all(|(v1, v2)| typed_eq(v1, v2, eq))
        }
        // Both are Erlang lists; only the empty ones can be equal.
        (Term::Table(t), Term::Array(a)) | (Term::Array(a), Term::Table(t)) => {
            t.inner().is_empty() && a.as_slice().is_empty()
        }
        _ => false,
    }
}

/// Inside tables and arrays every element carries its type atom, so types must agree there.
fn typed_eq(a: &AMQPValue, b: &AMQPValue, eq: Equality) -> bool {
    type_name(a) == type_name(b) && terms_eq(&term(a), &term(b), eq)
}

fn int_equals_float(i: i128, f: f64) -> bool {
    // Every i128 we build fits in 65 bits, so a float with no fraction inside ±2^100 converts
    // exactly and the comparison is exact, as Erlang's is.
    const LIMIT: f64 = 1.0e30;
    f.fract() == 0.0 && f.abs() < LIMIT && (f as i128) == i
}

/// Erlang `io_lib:format("~p", [Value])` of the parsed term, without line wrapping.
pub fn format_p(value: &AMQPValue) -> String {
    let mut out = Vec::new();
    write_p(&term(value), &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// `rabbit_misc:val/1` for a bare value: binaries with `~s`, everything else with `~p`,
/// inside single quotes.
pub fn format_val(value: &AMQPValue) -> String {
    format!("'{}'", format_s_or_p(value))
}

/// `rabbit_misc:val/1` for a `{Type, Value}` pair (an argument present on one side only).
pub fn format_typed_val(value: &AMQPValue) -> String {
    format!(
        "the value '{}' of type '{}'",
        format_s_or_p(value),
        type_name(value)
    )
}

fn format_s_or_p(value: &AMQPValue) -> String {
    match term(value) {
        // `~s` writes the bytes as they are.
        Term::Binary(bytes) => String::from_utf8_lossy(bytes).into_owned(),
        other => {
            let mut out = Vec::new();
            write_p(&other, &mut out);
            String::from_utf8_lossy(&out).into_owned()
        }
    }
}

fn write_p(t: &Term<'_>, out: &mut Vec<u8>) {
    match t {
        Term::Int(i) => out.extend_from_slice(i.to_string().as_bytes()),
        Term::Float(f) => out.extend_from_slice(format_float(*f).as_bytes()),
        Term::Binary(b) => write_binary_p(b, out),
        Term::Atom(a) => out.extend_from_slice(a.as_bytes()),
        Term::Decimal(s, v) => out.extend_from_slice(format!("{{{s},{v}}}").as_bytes()),
        Term::Table(table) => {
            out.push(b'[');
            for (n, (k, v)) in table.inner().iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                out.push(b'{');
                write_binary_p(k.as_str().as_bytes(), out);
                out.push(b',');
                out.extend_from_slice(type_name(v).as_bytes());
                out.push(b',');
                write_p(&term(v), out);
                out.push(b'}');
            }
            out.push(b']');
        }
        Term::Array(array) => {
            out.push(b'[');
            for (n, v) in array.as_slice().iter().enumerate() {
                if n > 0 {
                    out.push(b',');
                }
                out.push(b'{');
                out.extend_from_slice(type_name(v).as_bytes());
                out.push(b',');
                write_p(&term(v), out);
                out.push(b'}');
            }
            out.push(b']');
        }
    }
}

/// `~p` of a binary: `<<"text">>` when every byte is printable latin-1 (the default
/// printable range), else the list of byte values.
fn write_binary_p(bytes: &[u8], out: &mut Vec<u8>) {
    let printable = |b: u8| matches!(b, 32..=126 | 160..=255 | 8..=13 | 27);
    if bytes.is_empty() {
        out.extend_from_slice(b"<<>>");
    } else if bytes.iter().all(|&b| printable(b)) {
        out.extend_from_slice(b"<<\"");
        for &b in bytes {
            match b {
                b'"' => out.extend_from_slice(b"\\\""),
                b'\\' => out.extend_from_slice(b"\\\\"),
                b'\n' => out.extend_from_slice(b"\\n"),
                b'\r' => out.extend_from_slice(b"\\r"),
                b'\t' => out.extend_from_slice(b"\\t"),
                11 => out.extend_from_slice(b"\\v"),
                8 => out.extend_from_slice(b"\\b"),
                12 => out.extend_from_slice(b"\\f"),
                27 => out.extend_from_slice(b"\\e"),
                other => out.push(other),
            }
        }
        out.extend_from_slice(b"\">>");
    } else {
        out.extend_from_slice(b"<<");
        for (n, b) in bytes.iter().enumerate() {
            if n > 0 {
                out.push(b',');
            }
            out.extend_from_slice(b.to_string().as_bytes());
        }
        out.extend_from_slice(b">>");
    }
}

/// Close to Erlang's shortest float printing (`1.0`, `0.5`, `1.0e20`); exact for the
/// integral and short decimal values anyone puts in an argument.
fn format_float(f: f64) -> String {
    if f.fract() == 0.0 && f.abs() < 1.0e16 {
        return format!("{f:.1}");
    }
    let plain = format!("{f}");
    if f.abs() >= 1.0e-4 && f.abs() < 1.0e16 {
        return plain;
    }
    let sci = format!("{f:e}");
    match sci.split_once('e') {
        Some((mantissa, exp)) if !mantissa.contains('.') => format!("{mantissa}.0e{exp}"),
        _ => sci,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use amq_protocol::types::{DecimalValue, LongString};

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    #[test]
    fn numbers_are_equal_across_types_under_loose_eq_only() {
        assert!(loose_eq(&AMQPValue::LongInt(1), &AMQPValue::LongLongInt(1)));
        assert!(loose_eq(&AMQPValue::LongInt(1), &AMQPValue::Double(1.0)));
        assert!(loose_eq(&AMQPValue::Timestamp(7), &AMQPValue::ShortUInt(7)));
        assert!(!exact_eq(&AMQPValue::LongInt(1), &AMQPValue::Double(1.0)));
        assert!(exact_eq(&AMQPValue::LongInt(1), &AMQPValue::LongLongInt(1)));
        assert!(!loose_eq(&AMQPValue::LongInt(1), &s("1")));
        assert!(!loose_eq(&AMQPValue::Boolean(true), &s("true")));
        assert!(loose_eq(
            &s("abc"),
            &AMQPValue::ByteArray(b"abc".to_vec().into())
        ));
        assert!(!loose_eq(&AMQPValue::Void, &AMQPValue::Boolean(false)));
    }

    #[test]
    fn nested_values_compare_with_their_types() {
        let a1 = AMQPValue::FieldArray(vec![AMQPValue::LongInt(1)].into());
        let a2 = AMQPValue::FieldArray(vec![AMQPValue::LongLongInt(1)].into());
        let a3 = AMQPValue::FieldArray(vec![AMQPValue::LongInt(1)].into());
        assert!(!loose_eq(&a1, &a2));
        assert!(loose_eq(&a1, &a3));
        let empty_table = AMQPValue::FieldTable(FieldTable::default());
        let empty_array = AMQPValue::FieldArray(FieldArray::default());
        assert!(loose_eq(&empty_table, &empty_array));
    }

    #[test]
    fn erlang_printing() {
        assert_eq!(format_p(&s("foo")), "<<\"foo\">>");
        assert_eq!(format_p(&s("a\"b")), "<<\"a\\\"b\">>");
        assert_eq!(format_p(&s("")), "<<>>");
        assert_eq!(
            format_p(&AMQPValue::ByteArray(vec![1, 2].into())),
            "<<1,2>>"
        );
        assert_eq!(format_p(&AMQPValue::ShortShortInt(1)), "1");
        assert_eq!(format_p(&AMQPValue::Boolean(true)), "true");
        assert_eq!(format_p(&AMQPValue::Void), "undefined");
        assert_eq!(format_p(&AMQPValue::Double(1.0)), "1.0");
        assert_eq!(format_p(&AMQPValue::Double(0.5)), "0.5");
        assert_eq!(format_p(&AMQPValue::Double(1.0e20)), "1.0e20");
        assert_eq!(
            format_p(&AMQPValue::DecimalValue(DecimalValue {
                scale: 2,
                value: 5
            })),
            "{2,5}"
        );
        assert_eq!(format_val(&s("ae")), "'ae'");
        assert_eq!(format_val(&AMQPValue::LongInt(3)), "'3'");
        assert_eq!(
            format_typed_val(&s("ae")),
            "the value 'ae' of type 'longstr'"
        );
    }
}
