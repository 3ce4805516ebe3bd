//! Headers exchange bindings: a message matches a binding by comparing its headers with the
//! binding's arguments under the binding's `x-match` mode (`rabbit_exchange_type_headers`).
//!
//! The rules, as RabbitMQ 3.10 applies them:
//! - `x-match` is `all` (default when absent), `any`, `all-with-x` or `any-with-x`; any other
//!   value is refused at bind time with 406.
//! - `x-match` itself never takes part in matching; other `x-`-prefixed arguments take part
//!   only in the `-with-x` modes.
//! - An argument matches when the message has a header of that name and either the argument's
//!   value is void (presence test) or the values are equal under Erlang `==`: numbers of any
//!   integer or float type compare by value, strings compare with strings (longstr and byte
//!   array alike), nested tables and arrays must agree element by element including types.
//! - `all` with no remaining arguments matches every message; `any` with none matches nothing.
//! - Routing keys are ignored.

use std::sync::Arc;

use amq_protocol::types::{AMQPValue, FieldTable, ShortString};

use super::bound::{Bound, Variant};
use super::{term, BindingRef, Destination};
use crate::error::AmqpError;

/// The binding argument selecting the match mode.
pub const X_MATCH: &str = "x-match";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XMatch {
    All,
    Any,
    AllWithX,
    AnyWithX,
}

impl XMatch {
    /// Validates and reads `x-match` from binding arguments, as RabbitMQ's
    /// `validate_binding`: 406 for a string other than the four modes or for a non-string.
    pub fn from_arguments(arguments: &FieldTable) -> Result<XMatch, AmqpError> {
        let Some(value) = arguments.inner().get(X_MATCH) else {
            return Ok(XMatch::All);
        };
        let text = match value {
            AMQPValue::LongString(s) => s.as_bytes(),
            AMQPValue::ShortString(s) => s.as_str().as_bytes(),
            other => {
                return Err(AmqpError::precondition_failed(format!(
                    "Invalid x-match field type {} (value {}); expected longstr",
                    term::type_name(other),
                    term::format_p(other)
                )))
            }
        };
        match text {
            b"all" => Ok(XMatch::All),
            b"any" => Ok(XMatch::Any),
            b"all-with-x" => Ok(XMatch::AllWithX),
            b"any-with-x" => Ok(XMatch::AnyWithX),
            _ => Err(AmqpError::precondition_failed(format!(
                "Invalid x-match field value {}; expected all, any, all-with-x, or any-with-x",
                term::format_p(value)
            ))),
        }
    }

    /// RabbitMQ's `parse_x_match`: anything unrecognised means `all` (bindings predating
    /// validation). Used where arguments were never validated.
    fn lenient(arguments: &FieldTable) -> XMatch {
        XMatch::from_arguments(arguments).unwrap_or(XMatch::All)
    }

    fn with_x(self) -> bool {
        matches!(self, XMatch::AllWithX | XMatch::AnyWithX)
    }
}

/// A binding's arguments reduced to what matching reads.
#[derive(Debug, Clone)]
struct Spec {
    mode: XMatch,
    /// The arguments that take part, in key order.
    pattern: Vec<(ShortString, AMQPValue)>,
}

impl Spec {
    fn new(mode: XMatch, arguments: &FieldTable) -> Spec {
        let pattern = arguments
            .inner()
            .iter()
            .filter(|(key, _)| {
                let key = key.as_str();
                key != X_MATCH && (mode.with_x() || !key.starts_with("x-"))
            })
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Spec { mode, pattern }
    }

    fn matches(&self, headers: Option<&FieldTable>) -> bool {
        let one = |(key, want): &(ShortString, AMQPValue)| match headers
            .and_then(|h| h.inner().get(key))
        {
            None => false,
            Some(_) if matches!(want, AMQPValue::Void) => true,
            Some(have) => term::loose_eq(want, have),
        };
        match self.mode {
            XMatch::All | XMatch::AllWithX => self.pattern.iter().all(one),
            XMatch::Any | XMatch::AnyWithX => self.pattern.iter().any(one),
        }
    }
}

/// Whether a message with `headers` matches a binding with `arguments` (unvalidated
/// arguments are read leniently, as RabbitMQ does).
pub fn headers_match(arguments: &FieldTable, headers: Option<&FieldTable>) -> bool {
    Spec::new(XMatch::lenient(arguments), arguments).matches(headers)
}

#[derive(Debug)]
struct HeadersVariant {
    routing_key: Arc<str>,
    arguments: FieldTable,
    spec: Spec,
}

impl Variant for HeadersVariant {
    fn routing_key(&self) -> &Arc<str> {
        &self.routing_key
    }
    fn arguments(&self) -> &FieldTable {
        &self.arguments
    }
}

/// Routing tests every binding (there is no index for header patterns), each destination
/// being emitted once however many of its bindings match.
#[derive(Debug, Default)]
pub struct HeadersBindings {
    bound: Bound<HeadersVariant>,
}

impl HeadersBindings {
    /// Validates `x-match`, then adds the binding; `Ok(false)` when the identical binding
    /// already exists. RabbitMQ validates before looking for a duplicate, so a bad `x-match`
    /// fails even then.
    pub fn bind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> Result<bool, AmqpError> {
        let mode = XMatch::from_arguments(arguments)?;
        Ok(self
            .bound
            .insert(destination, routing_key, arguments, || HeadersVariant {
                routing_key: Arc::from(routing_key),
                arguments: arguments.clone(),
                spec: Spec::new(mode, arguments),
            }))
    }

    /// Removes the identical binding; `false` when there was none. No validation: RabbitMQ
    /// does not validate on unbind.
    pub fn unbind(
        &mut self,
        destination: &Destination,
        routing_key: &str,
        arguments: &FieldTable,
    ) -> bool {
        self.bound.remove(destination, routing_key, arguments)
    }

    /// Appends each destination with at least one binding matching `headers`.
    pub fn route(&self, headers: Option<&FieldTable>, out: &mut Vec<Destination>) {
        for (destination, variants) in self.bound.entries() {
            if variants.iter().any(|v| v.spec.matches(headers)) {
                out.push(destination.clone());
            }
        }
    }

    /// Removes every binding to `destination`, returning their keys and arguments.
    pub fn remove_destination(&mut self, destination: &Destination) -> Vec<(Arc<str>, FieldTable)> {
        let mut removed = Vec::new();
        self.bound.remove_destination(destination, &mut removed);
        removed
    }

    pub fn bindings(&self) -> Vec<BindingRef<'_>> {
        let mut out = Vec::with_capacity(self.bound.len());
        self.bound.append_refs(&mut out);
        out
    }

    pub fn len(&self) -> usize {
        self.bound.len()
    }

    pub fn is_empty(&self) -> bool {
        self.bound.is_empty()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::error::code;
    use amq_protocol::types::{FieldArray, LongString};

    fn s(v: &str) -> AMQPValue {
        AMQPValue::LongString(LongString::from(v))
    }

    fn table(entries: &[(&str, AMQPValue)]) -> FieldTable {
        let mut t = FieldTable::default();
        for (k, v) in entries {
            t.insert((*k).into(), v.clone());
        }
        t
    }

    /// (binding arguments, message headers, expected match)
    type Case = (FieldTable, Option<FieldTable>, bool);

    fn check(cases: Vec<Case>) {
        for (n, (args, headers, expected)) in cases.iter().enumerate() {
            assert_eq!(
                headers_match(args, headers.as_ref()),
                *expected,
                "case {n}: args {args:?} headers {headers:?}"
            );
        }
    }

    #[test]
    fn x_match_all() {
        let args = table(&[("a", s("1")), ("b", AMQPValue::LongInt(2))]);
        check(vec![
            (
                args.clone(),
                Some(table(&[("a", s("1")), ("b", AMQPValue::LongInt(2))])),
                true,
            ),
            (
                args.clone(),
                Some(table(&[
                    ("a", s("1")),
                    ("b", AMQPValue::LongInt(2)),
                    ("c", s("extra")),
                ])),
                true,
            ),
            (args.clone(), Some(table(&[("a", s("1"))])), false),
            (
                args.clone(),
                Some(table(&[("a", s("1")), ("b", AMQPValue::LongInt(3))])),
                false,
            ),
            (args.clone(), None, false),
            (args.clone(), Some(FieldTable::default()), false),
            // No arguments: all matches everything, even a message without headers.
            (FieldTable::default(), None, true),
            (
                table(&[("x-match", s("all"))]),
                Some(table(&[("z", s("z"))])),
                true,
            ),
        ]);
    }

    #[test]
    fn x_match_any() {
        let args = table(&[
            ("x-match", s("any")),
            ("a", s("1")),
            ("b", AMQPValue::LongInt(2)),
        ]);
        check(vec![
            (args.clone(), Some(table(&[("a", s("1"))])), true),
            (
                args.clone(),
                Some(table(&[("b", AMQPValue::LongInt(2))])),
                true,
            ),
            (
                args.clone(),
                Some(table(&[("a", s("2")), ("b", AMQPValue::LongInt(3))])),
                false,
            ),
            (args.clone(), None, false),
            // any with nothing to compare matches nothing.
            (
                table(&[("x-match", s("any"))]),
                Some(table(&[("a", s("1"))])),
                false,
            ),
            (table(&[("x-match", s("any"))]), None, false),
        ]);
    }

    #[test]
    fn x_prefixed_arguments_ignored_unless_with_x() {
        let all = table(&[("x-foo", s("1")), ("a", s("1"))]);
        let all_x = table(&[
            ("x-match", s("all-with-x")),
            ("x-foo", s("1")),
            ("a", s("1")),
        ]);
        let any = table(&[("x-match", s("any")), ("x-foo", s("1"))]);
        let any_x = table(&[("x-match", s("any-with-x")), ("x-foo", s("1"))]);
        let with_x = Some(table(&[("x-foo", s("1")), ("a", s("1"))]));
        let without_x = Some(table(&[("a", s("1"))]));
        check(vec![
            (all.clone(), without_x.clone(), true),
            (all.clone(), with_x.clone(), true),
            (all_x.clone(), without_x.clone(), false),
            (all_x.clone(), with_x.clone(), true),
            (any.clone(), with_x.clone(), false),
            (any_x.clone(), with_x.clone(), true),
            (any_x.clone(), without_x.clone(), false),
            // x-match itself never matches, even in with-x mode.
            (
                table(&[("x-match", s("any-with-x"))]),
                Some(table(&[("x-match", s("any-with-x"))])),
                false,
            ),
        ]);
    }

    #[test]
    fn void_argument_tests_presence() {
        let all = table(&[("a", AMQPValue::Void)]);
        let any = table(&[
            ("x-match", s("any")),
            ("a", AMQPValue::Void),
            ("b", s("no")),
        ]);
        check(vec![
            (all.clone(), Some(table(&[("a", s("anything"))])), true),
            (all.clone(), Some(table(&[("a", AMQPValue::Void)])), true),
            (all.clone(), Some(table(&[("b", s("x"))])), false),
            (all.clone(), None, false),
            (
                any.clone(),
                Some(table(&[("a", AMQPValue::Boolean(false))])),
                true,
            ),
            (any.clone(), Some(table(&[("c", s("x"))])), false),
            // A void header only equals a void argument by presence, not a value.
            (
                table(&[("a", s("v"))]),
                Some(table(&[("a", AMQPValue::Void)])),
                false,
            ),
        ]);
    }

    #[test]
    fn comparison_follows_erlang_equality() {
        let int1 = table(&[("n", AMQPValue::LongInt(1))]);
        check(vec![
            (
                int1.clone(),
                Some(table(&[("n", AMQPValue::LongLongInt(1))])),
                true,
            ),
            (
                int1.clone(),
                Some(table(&[("n", AMQPValue::ShortShortUInt(1))])),
                true,
            ),
            (
                int1.clone(),
                Some(table(&[("n", AMQPValue::Double(1.0))])),
                true,
            ),
            (
                int1.clone(),
                Some(table(&[("n", AMQPValue::Timestamp(1))])),
                true,
            ),
            (
                int1.clone(),
                Some(table(&[("n", AMQPValue::Double(1.5))])),
                false,
            ),
            (int1.clone(), Some(table(&[("n", s("1"))])), false),
            (
                int1.clone(),
                Some(table(&[("n", AMQPValue::Boolean(true))])),
                false,
            ),
            (
                table(&[("t", AMQPValue::Boolean(true))]),
                Some(table(&[("t", s("true"))])),
                false,
            ),
            (
                table(&[("b", s("raw"))]),
                Some(table(&[(
                    "b",
                    AMQPValue::ByteArray(b"raw".to_vec().into()),
                )])),
                true,
            ),
            (
                table(&[(
                    "a",
                    AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongInt(1)])),
                )]),
                Some(table(&[(
                    "a",
                    AMQPValue::FieldArray(FieldArray::from(vec![AMQPValue::LongLongInt(1)])),
                )])),
                false,
            ),
            // Keys are case-sensitive.
            (
                table(&[("A", s("1"))]),
                Some(table(&[("a", s("1"))])),
                false,
            ),
        ]);
    }

    #[test]
    fn bad_x_match_refused_at_bind() {
        let mut b = HeadersBindings::default();
        let q = Destination::Queue("q".into());
        let e = b
            .bind(&q, "", &table(&[("x-match", s("most"))]))
            .unwrap_err();
        assert_eq!(e.code, code::PRECONDITION_FAILED);
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - Invalid x-match field value <<\"most\">>; \
             expected all, any, all-with-x, or any-with-x"
        );
        let e = b
            .bind(&q, "", &table(&[("x-match", AMQPValue::ShortShortInt(1))]))
            .unwrap_err();
        assert_eq!(
            e.text,
            "PRECONDITION_FAILED - Invalid x-match field type byte (value 1); expected longstr"
        );
        assert!(b.is_empty());
    }

    #[test]
    fn routes_each_destination_once() {
        let mut b = HeadersBindings::default();
        let q = Destination::Queue("q".into());
        let any = table(&[("x-match", s("any")), ("a", s("1"))]);
        let all = table(&[("a", s("1"))]);
        assert!(b.bind(&q, "", &any).unwrap());
        assert!(b.bind(&q, "", &all).unwrap());
        assert!(!b.bind(&q, "", &all).unwrap());
        assert!(b.bind(&q, "k", &all).unwrap());
        assert_eq!(b.len(), 3);
        let mut out = Vec::new();
        b.route(Some(&table(&[("a", s("1"))])), &mut out);
        assert_eq!(out, vec![q.clone()]);
        out.clear();
        b.route(Some(&table(&[("a", s("2"))])), &mut out);
        assert!(out.is_empty());
        assert!(b.unbind(&q, "", &all));
        assert!(!b.unbind(&q, "", &all));
        assert_eq!(b.remove_destination(&q).len(), 2);
        assert!(b.is_empty());
    }
}
