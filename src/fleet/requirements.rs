//! DCV placement `Requirements`: the expression a CreateSessions request
//! uses to say which servers may run the session, parsed once and then
//! evaluated against each candidate [`ServerRecord`].
//!
//! # The language
//!
//! ```text
//! requirements := or
//! or           := and { "or" and }
//! and          := not { "and" not }
//! not          := { "not" } primary
//! primary      := "(" or ")" | comparison
//! comparison   := operand op value
//! operand      := "tag:" key | "server:" property
//! key          := bare-key | string
//! op           := "=" | "!=" | "<" | "<=" | ">" | ">=" | ":="
//! value        := string | number
//! string       := "'" { any character but "'" | "''" } "'"
//! number       := [ "+" | "-" ] digits [ "." digits ] [ ( "e" | "E" ) [ "+" | "-" ] digits ]
//! ```
//!
//! - **Boolean operators.** `not` binds tightest, then `and`, then `or`;
//!   `and` and `or` are left-associative (`a or b or c` is
//!   `(a or b) or c`). Parentheses group. The keywords are
//!   case-insensitive (`AND`, `Not`). A keyword is a whole word, delimited
//!   like a bare key (below): `tag:android` is a tag key, `notable` is not
//!   `not`, and `(tag:a = 'x')or(tag:b = 'y')` needs no spaces.
//! - **Whitespace** (Unicode) separates tokens and is otherwise ignored.
//! - **Operands.** `tag:KEY` is the server's tag `KEY`: a custom tag from
//!   its agent or a built-in `dcv:` tag (`dcv:os-family`,
//!   `dcv:max-virtual-sessions`, `dcv:max-concurrent-sessions-per-user`);
//!   for a repeated custom key the last value wins. A bare key is a run of
//!   characters ending at whitespace, `(`, `)`, `'`, `=`, `!`, `<`, `>` or
//!   the two characters `:=`; a `:` not followed by `=` belongs to the key,
//!   so `tag:dcv:os-family` works. Any other key is written as a string
//!   straight after the colon: `tag:'my key'`. Keys are case-sensitive.
//!   The prefixes `tag:` and `server:` are lowercase.
//! - **Server properties** (case-sensitive, DCV's names): `Id`, `Hostname`,
//!   `Version`, `SessionManagerAgentVersion`, `Host.Os.BuildNumber`,
//!   `Host.Os.Family` (`windows`, `linux` or `macos`),
//!   `Host.Os.KernelVersion`, `Host.Os.Name`, `Host.Os.Version`,
//!   `Host.Memory.TotalBytes`, `Host.Memory.UsedBytes`,
//!   `Host.Swap.TotalBytes`, `Host.Swap.UsedBytes`,
//!   `Host.CpuLoadAverage.OneMinute`, `Host.CpuLoadAverage.FiveMinutes`,
//!   `Host.CpuLoadAverage.FifteenMinutes`, `Host.Aws.Ec2InstanceId`,
//!   `Host.Aws.Ec2InstanceType`, `Host.Aws.Region`, `Host.Aws.Ec2ImageId`,
//!   `Host.CpuInfo.Architecture`, `Host.CpuInfo.ModelName`,
//!   `Host.CpuInfo.NumberOfCpus`, `Host.CpuInfo.PhysicalCoresPerCpu`,
//!   `Host.CpuInfo.Vendor`. The wire spellings `Host.Aws.EC2InstanceId`,
//!   `Host.Aws.EC2InstanceType` and `Host.Aws.EC2ImageId` are accepted too.
//!   The memory, swap, load-average, `NumberOfCpus` and
//!   `PhysicalCoresPerCpu` properties are numbers; every other property,
//!   and every tag, is a string.
//! - **Values.** A string is single-quoted; a quote inside it is doubled
//!   (`'o''neil'` is `o'neil`); it may hold any other character, newlines
//!   included. A number has an optional sign, digits, an optional fraction
//!   and an optional exponent: `2`, `-1`, `0.5`, `1024E6`, `2.5e-3` (not
//!   `.5`, `5.` or `1e`). A number is delimited like a bare key, so `1and`
//!   is an invalid number, not `1 and`.
//!
//! # Evaluation
//!
//! A comparison first looks up its operand on the server.
//!
//! - **A missing operand** (no such tag; a `Host.Aws.*` property of a
//!   server not on EC2) makes the comparison false whatever the operator,
//!   `!=` included. `not` of such a comparison is therefore true:
//!   `not tag:gpu = 'true'` matches servers without a `gpu` tag. An empty
//!   string (the kernel version of a Windows host) is a value, not missing.
//! - **Number value, operators other than `:=`:** numeric comparison. A
//!   numeric property is compared as is (load averages at the precision the
//!   agent reports them, so `OneMinute <= 0.1` holds for a reported 0.1;
//!   integers are exact up to 2^53). A string operand is read with the
//!   `number` syntax above (the whole string, no surrounding whitespace);
//!   if it is not a number, the comparison is false (`!=` included).
//! - **String value, operators other than `:=`:** `=` and `!=` compare
//!   exactly (case-sensitive); `<`, `<=`, `>` and `>=` compare
//!   lexicographically by UTF-8 bytes (so `'10' < '9'`).
//! - **`:=` (contains)** is true when the operand's text contains the
//!   value's text: a string value as unescaped, a number value as written
//!   (`:= 1e3` looks for the three characters `1e3`).
//! - **A numeric property against a string value** (or `:=`) uses the
//!   property's canonical text: integers in decimal without a fraction
//!   (`16`), load averages in their shortest decimal form (`0.25`, `2`).
//!
//! # Errors and limits
//!
//! [`Requirements::parse`] never panics. It reports the first problem in
//! reading order as a [`ParseError`] whose `position` is the 0-based
//! character (not byte) offset into the input; its `Display` reads
//! `at character N: message` with N counted from 1. Problems reported:
//! an empty expression; an unexpected end; an unterminated string (at its
//! opening quote); an unknown operand prefix; a `tag:` without a key; an
//! unknown server property (at the property name); a missing operator; a
//! missing or malformed value; an unmatched `(` (at the end, naming the
//! `(`) or `)`; input left after a complete expression; a lone `!`; an
//! expression over [`MAX_EXPRESSION_CHARS`] characters (at the first
//! character past the limit); nesting deeper than [`MAX_DEPTH`] (at the
//! `(` or `not` that goes one level too deep); an expression whose
//! canonical form (below) would be over [`MAX_EXPRESSION_CHARS`] (at
//! character 1: the whole expression is the problem).
//!
//! # Canonical form
//!
//! [`Requirements`] prints (`Display`) a canonical form that parses back
//! to an equal value: lowercase keywords, single spaces around operators
//! and keywords, only the parentheses the structure needs, tag keys quoted
//! only when they must be, numbers exactly as written and the `Ec2`
//! spelling of the AWS properties. Because it may add spaces the input
//! left out (`tag:a=1` prints as `tag:a = 1`), the length limit applies to
//! it as well as to the input; that is what makes every accepted
//! expression's canonical form parse back.

use std::{borrow::Cow, cmp::Ordering, fmt};

use super::model::ServerRecord;

/// The longest expression accepted, in characters, both as written and in
/// canonical form. DCV's examples are a line long and real ones pin a tag
/// or two; the bound keeps parsing, and evaluation against every candidate
/// server, cheap for every request.
pub const MAX_EXPRESSION_CHARS: usize = 4096;

/// The deepest nesting accepted: each `(` and each `not` opens a level
/// that lasts until the end of the operand it applies to. The parser
/// recurses per level, so the bound keeps its stack use (and that of
/// evaluating and printing the result) small and fixed; no sensible
/// expression comes near it.
pub const MAX_DEPTH: usize = 64;

/// Why a `Requirements` expression did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("at character {}: {}", .position.saturating_add(1), .message)]
pub struct ParseError {
    /// 0-based offset, in characters (not bytes), into the input where the
    /// problem was found. `Display` shows it counted from 1.
    pub position: usize,
    /// What is wrong, for a person to read.
    pub message: String,
}

impl ParseError {
    fn new(position: usize, message: impl Into<String>) -> Self {
        ParseError {
            position,
            message: message.into(),
        }
    }
}

/// A parsed `Requirements` expression, ready to evaluate against servers.
///
/// It carries what placement needs to bound its work, computed once when
/// the request is parsed (outside the fleet's lock): its canonical text
/// and a fingerprint of it (identical expressions are evaluated once per
/// server, however many requests carry them), and its [cost](Self::cost).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirements {
    expr: Expr,
    canonical: std::sync::Arc<str>,
    fingerprint: u64,
    cost: u64,
}

/// The cost of one comparison beyond its characters: the operand's lookup
/// (a tag is found by a scan of the server's tags).
pub const COMPARISON_COST: u64 = 16;

impl Requirements {
    /// Parses an expression (see the module documentation for the
    /// language). Never panics, whatever the input.
    pub fn parse(text: &str) -> Result<Requirements, ParseError> {
        if text.chars().nth(MAX_EXPRESSION_CHARS).is_some() {
            return Err(ParseError::new(
                MAX_EXPRESSION_CHARS,
                format!("expression is longer than {MAX_EXPRESSION_CHARS} characters"),
            ));
        }
        let expr = parse_unbounded(text)?;
        let mut canonical = CharBudget(MAX_EXPRESSION_CHARS);
        if fmt::write(&mut canonical, format_args!("{expr}")).is_err() {
            return Err(ParseError::new(
                0,
                format!(
                    "expression is longer than {MAX_EXPRESSION_CHARS} characters once written \
                     in canonical form (with a space around each operator and keyword)"
                ),
            ));
        }
        let chars = (MAX_EXPRESSION_CHARS - canonical.0) as u64;
        let canonical: std::sync::Arc<str> = std::sync::Arc::from(expr.to_string());
        let fingerprint = {
            use std::hash::{Hash, Hasher};
            // Fixed keys: equal texts must agree across requests. A
            // collision costs only a comparison of the texts.
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            canonical.hash(&mut hasher);
            hasher.finish()
        };
        let cost = chars + COMPARISON_COST * expr.comparisons();
        Ok(Requirements {
            expr,
            canonical,
            fingerprint,
            cost,
        })
    }

    /// Whether `server` satisfies the expression.
    pub fn matches(&self, server: &ServerRecord) -> bool {
        self.expr.matches(server)
    }

    /// The most work one evaluation against one server can take, in cost
    /// units: a unit per character of the canonical form (string
    /// comparisons are linear in it) plus [`COMPARISON_COST`] per
    /// comparison. At most about 4,096 + 16 × 1,000.
    pub fn cost(&self) -> u64 {
        self.cost
    }

    /// The canonical text (what `Display` prints).
    pub fn canonical(&self) -> &std::sync::Arc<str> {
        &self.canonical
    }

    /// A hash of the canonical text, the same for equal expressions.
    pub fn fingerprint(&self) -> u64 {
        self.fingerprint
    }

    /// Whether `other` is the same expression (as text), cheaply when it
    /// is not.
    pub fn same_as(&self, other: &Requirements) -> bool {
        self.fingerprint == other.fingerprint && self.canonical == other.canonical
    }

    /// The parsed expression.
    pub fn expr(&self) -> &Expr {
        &self.expr
    }
}

impl fmt::Display for Requirements {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.canonical)
    }
}

/// A `fmt::Write` sink that fails once more than its budget of
/// characters is written: measures the canonical form without building it.
struct CharBudget(usize);

impl fmt::Write for CharBudget {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 = self.0.checked_sub(s.chars().count()).ok_or(fmt::Error)?;
        Ok(())
    }
}

/// An expression tree. `And` and `Or` are binary and left-nested as
/// parsed: `a and b and c` is `And(And(a, b), c)`. Redundant parentheses
/// leave no trace.
///
/// Every value prints (`Display`) in the canonical form and parses back
/// to itself, provided it stays within [`MAX_DEPTH`] and
/// [`MAX_EXPRESSION_CHARS`] once printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expr {
    /// `OPERAND OP VALUE`.
    Compare(Comparison),
    /// `not E`: true when `E` is false.
    Not(Box<Expr>),
    /// `L and R`: true when both are.
    And(Box<Expr>, Box<Expr>),
    /// `L or R`: true when either is.
    Or(Box<Expr>, Box<Expr>),
}

impl Expr {
    /// How many comparisons the expression holds.
    pub fn comparisons(&self) -> u64 {
        match self {
            Expr::Compare(_) => 1,
            Expr::Not(e) => e.comparisons(),
            Expr::And(l, r) | Expr::Or(l, r) => l.comparisons() + r.comparisons(),
        }
    }

    /// Whether `server` satisfies the expression. `and` and `or`
    /// short-circuit left to right (evaluation has no side effects, so
    /// only the cost shows it).
    pub fn matches(&self, server: &ServerRecord) -> bool {
        match self {
            Expr::Compare(c) => c.matches(server),
            Expr::Not(e) => !e.matches(server),
            Expr::And(l, r) => l.matches(server) && r.matches(server),
            Expr::Or(l, r) => l.matches(server) || r.matches(server),
        }
    }
}

impl fmt::Display for Expr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Parenthesise a child only where the grammar needs it: `not` takes
        // a primary; `and` takes `not`-level operands and is left-nested;
        // `or` is left-nested.
        fn child(f: &mut fmt::Formatter<'_>, e: &Expr, parens: bool) -> fmt::Result {
            if parens {
                write!(f, "({e})")
            } else {
                write!(f, "{e}")
            }
        }
        match self {
            Expr::Compare(c) => c.fmt(f),
            Expr::Not(e) => {
                f.write_str("not ")?;
                child(f, e, matches!(**e, Expr::And(..) | Expr::Or(..)))
            }
            Expr::And(l, r) => {
                child(f, l, matches!(**l, Expr::Or(..)))?;
                f.write_str(" and ")?;
                child(f, r, matches!(**r, Expr::And(..) | Expr::Or(..)))
            }
            Expr::Or(l, r) => {
                child(f, l, false)?;
                f.write_str(" or ")?;
                child(f, r, matches!(**r, Expr::Or(..)))
            }
        }
    }
}

/// One comparison: `OPERAND OP VALUE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Comparison {
    /// What is looked up on the server.
    pub operand: Operand,
    /// How it is compared.
    pub op: Op,
    /// What it is compared with.
    pub value: Value,
}

impl Comparison {
    /// Whether `server` satisfies the comparison (see the module
    /// documentation for the rules).
    pub fn matches(&self, server: &ServerRecord) -> bool {
        let Some(actual) = self.operand.resolve(server) else {
            return false;
        };
        match (&self.value, self.op) {
            (Value::Str(s), Op::Contains) => actual.text().contains(s.as_str()),
            (Value::Number(n), Op::Contains) => actual.text().contains(n.as_str()),
            (Value::Str(s), op) => op.holds(actual.text().as_ref().cmp(s.as_str())),
            (Value::Number(n), op) => actual
                .number()
                .and_then(|a| a.partial_cmp(&n.value()))
                .is_some_and(|ordering| op.holds(ordering)),
        }
    }
}

impl fmt::Display for Comparison {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {} {}", self.operand, self.op, self.value)
    }
}

/// The left side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Operand {
    /// `tag:KEY`: a custom or built-in tag's value (a string).
    Tag(String),
    /// `server:PROPERTY`.
    Server(Property),
}

impl Operand {
    fn resolve<'a>(&self, server: &'a ServerRecord) -> Option<Actual<'a>> {
        match self {
            Operand::Tag(key) => server.tag(key).map(Actual::Text),
            Operand::Server(p) => p.resolve(server),
        }
    }
}

impl fmt::Display for Operand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Operand::Tag(key) if is_bare_key(key) => write!(f, "tag:{key}"),
            Operand::Tag(key) => {
                f.write_str("tag:")?;
                write_quoted(f, key)
            }
            Operand::Server(p) => write!(f, "server:{}", p.name()),
        }
    }
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    /// `=`
    Eq,
    /// `!=`
    Ne,
    /// `<`
    Lt,
    /// `<=`
    Le,
    /// `>`
    Gt,
    /// `>=`
    Ge,
    /// `:=`: the operand's text contains the value's.
    Contains,
}

impl Op {
    /// Every operator.
    pub const ALL: [Op; 7] = [Op::Eq, Op::Ne, Op::Lt, Op::Le, Op::Gt, Op::Ge, Op::Contains];

    /// The operator as written.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Eq => "=",
            Op::Ne => "!=",
            Op::Lt => "<",
            Op::Le => "<=",
            Op::Gt => ">",
            Op::Ge => ">=",
            Op::Contains => ":=",
        }
    }

    /// Whether an ordering of operand against value satisfies an ordering
    /// operator (`:=` never does; it is evaluated apart).
    fn holds(self, ordering: Ordering) -> bool {
        match self {
            Op::Eq => ordering == Ordering::Equal,
            Op::Ne => ordering != Ordering::Equal,
            Op::Lt => ordering == Ordering::Less,
            Op::Le => ordering != Ordering::Greater,
            Op::Gt => ordering == Ordering::Greater,
            Op::Ge => ordering != Ordering::Less,
            Op::Contains => false,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The right side of a comparison.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Value {
    /// A quoted string, unescaped.
    Str(String),
    /// A number.
    Number(Number),
}

impl fmt::Display for Value {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Value::Str(s) => write_quoted(f, s),
            Value::Number(n) => f.write_str(n.as_str()),
        }
    }
}

/// A number literal: its text as written (which `:=` and the canonical
/// form use) and its value. Only [`Number::parse`] makes one, so the text
/// is always valid `number` syntax.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Number {
    text: String,
}

impl Number {
    /// Reads a literal in the language's `number` syntax (the whole of
    /// `text`); `None` if it is not one.
    pub fn parse(text: &str) -> Option<Number> {
        number_value(text).map(|_| Number {
            text: text.to_string(),
        })
    }

    /// The literal as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The literal's value (infinite when the exponent overflows `f64`).
    pub fn value(&self) -> f64 {
        number_value(&self.text).unwrap_or(f64::NAN)
    }
}

/// The value of `text` if the whole of it is `number` syntax.
fn number_value(text: &str) -> Option<f64> {
    let bytes = text.as_bytes();
    let mut i = 0;
    let digits = |i: &mut usize| {
        let start = *i;
        while bytes.get(*i).is_some_and(u8::is_ascii_digit) {
            *i += 1;
        }
        *i > start
    };
    if matches!(bytes.first(), Some(b'+' | b'-')) {
        i += 1;
    }
    if !digits(&mut i) {
        return None;
    }
    if bytes.get(i) == Some(&b'.') {
        i += 1;
        if !digits(&mut i) {
            return None;
        }
    }
    if matches!(bytes.get(i), Some(b'e' | b'E')) {
        i += 1;
        if matches!(bytes.get(i), Some(b'+' | b'-')) {
            i += 1;
        }
        if !digits(&mut i) {
            return None;
        }
    }
    if i != bytes.len() {
        return None;
    }
    text.parse().ok()
}

/// A server property that `server:` can name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Property {
    /// `Id` (string).
    Id,
    /// `Hostname` (string).
    Hostname,
    /// `Version`: the DCV server's (string).
    Version,
    /// `SessionManagerAgentVersion` (string).
    SessionManagerAgentVersion,
    /// `Host.Os.BuildNumber` (string).
    HostOsBuildNumber,
    /// `Host.Os.Family`: `windows`, `linux` or `macos` (string).
    HostOsFamily,
    /// `Host.Os.KernelVersion` (string).
    HostOsKernelVersion,
    /// `Host.Os.Name` (string).
    HostOsName,
    /// `Host.Os.Version` (string).
    HostOsVersion,
    /// `Host.Memory.TotalBytes` (number).
    HostMemoryTotalBytes,
    /// `Host.Memory.UsedBytes` (number).
    HostMemoryUsedBytes,
    /// `Host.Swap.TotalBytes` (number).
    HostSwapTotalBytes,
    /// `Host.Swap.UsedBytes` (number).
    HostSwapUsedBytes,
    /// `Host.CpuLoadAverage.OneMinute` (number).
    HostCpuLoadAverageOneMinute,
    /// `Host.CpuLoadAverage.FiveMinutes` (number).
    HostCpuLoadAverageFiveMinutes,
    /// `Host.CpuLoadAverage.FifteenMinutes` (number).
    HostCpuLoadAverageFifteenMinutes,
    /// `Host.Aws.Ec2InstanceId` (string; missing off EC2).
    HostAwsEc2InstanceId,
    /// `Host.Aws.Ec2InstanceType` (string; missing off EC2).
    HostAwsEc2InstanceType,
    /// `Host.Aws.Region` (string; missing off EC2).
    HostAwsRegion,
    /// `Host.Aws.Ec2ImageId` (string; missing off EC2).
    HostAwsEc2ImageId,
    /// `Host.CpuInfo.Architecture` (string).
    HostCpuInfoArchitecture,
    /// `Host.CpuInfo.ModelName` (string).
    HostCpuInfoModelName,
    /// `Host.CpuInfo.NumberOfCpus` (number).
    HostCpuInfoNumberOfCpus,
    /// `Host.CpuInfo.PhysicalCoresPerCpu` (number).
    HostCpuInfoPhysicalCoresPerCpu,
    /// `Host.CpuInfo.Vendor` (string).
    HostCpuInfoVendor,
}

impl Property {
    /// Every property, in DCV's documentation order.
    pub const ALL: [Property; 25] = [
        Property::Id,
        Property::Hostname,
        Property::Version,
        Property::SessionManagerAgentVersion,
        Property::HostOsBuildNumber,
        Property::HostOsFamily,
        Property::HostOsKernelVersion,
        Property::HostOsName,
        Property::HostOsVersion,
        Property::HostMemoryTotalBytes,
        Property::HostMemoryUsedBytes,
        Property::HostSwapTotalBytes,
        Property::HostSwapUsedBytes,
        Property::HostCpuLoadAverageOneMinute,
        Property::HostCpuLoadAverageFiveMinutes,
        Property::HostCpuLoadAverageFifteenMinutes,
        Property::HostAwsEc2InstanceId,
        Property::HostAwsEc2InstanceType,
        Property::HostAwsRegion,
        Property::HostAwsEc2ImageId,
        Property::HostCpuInfoArchitecture,
        Property::HostCpuInfoModelName,
        Property::HostCpuInfoNumberOfCpus,
        Property::HostCpuInfoPhysicalCoresPerCpu,
        Property::HostCpuInfoVendor,
    ];

    /// The canonical name, as written after `server:`.
    pub fn name(self) -> &'static str {
        match self {
            Property::Id => "Id",
            Property::Hostname => "Hostname",
            Property::Version => "Version",
            Property::SessionManagerAgentVersion => "SessionManagerAgentVersion",
            Property::HostOsBuildNumber => "Host.Os.BuildNumber",
            Property::HostOsFamily => "Host.Os.Family",
            Property::HostOsKernelVersion => "Host.Os.KernelVersion",
            Property::HostOsName => "Host.Os.Name",
            Property::HostOsVersion => "Host.Os.Version",
            Property::HostMemoryTotalBytes => "Host.Memory.TotalBytes",
            Property::HostMemoryUsedBytes => "Host.Memory.UsedBytes",
            Property::HostSwapTotalBytes => "Host.Swap.TotalBytes",
            Property::HostSwapUsedBytes => "Host.Swap.UsedBytes",
            Property::HostCpuLoadAverageOneMinute => "Host.CpuLoadAverage.OneMinute",
            Property::HostCpuLoadAverageFiveMinutes => "Host.CpuLoadAverage.FiveMinutes",
            Property::HostCpuLoadAverageFifteenMinutes => "Host.CpuLoadAverage.FifteenMinutes",
            Property::HostAwsEc2InstanceId => "Host.Aws.Ec2InstanceId",
            Property::HostAwsEc2InstanceType => "Host.Aws.Ec2InstanceType",
            Property::HostAwsRegion => "Host.Aws.Region",
            Property::HostAwsEc2ImageId => "Host.Aws.Ec2ImageId",
            Property::HostCpuInfoArchitecture => "Host.CpuInfo.Architecture",
            Property::HostCpuInfoModelName => "Host.CpuInfo.ModelName",
            Property::HostCpuInfoNumberOfCpus => "Host.CpuInfo.NumberOfCpus",
            Property::HostCpuInfoPhysicalCoresPerCpu => "Host.CpuInfo.PhysicalCoresPerCpu",
            Property::HostCpuInfoVendor => "Host.CpuInfo.Vendor",
        }
    }

    /// The property a name denotes: a canonical name (case-sensitive) or
    /// one of the wire spellings `Host.Aws.EC2InstanceId`,
    /// `Host.Aws.EC2InstanceType` and `Host.Aws.EC2ImageId`.
    pub fn from_name(name: &str) -> Option<Property> {
        match name {
            "Host.Aws.EC2InstanceId" => Some(Property::HostAwsEc2InstanceId),
            "Host.Aws.EC2InstanceType" => Some(Property::HostAwsEc2InstanceType),
            "Host.Aws.EC2ImageId" => Some(Property::HostAwsEc2ImageId),
            _ => Property::ALL.into_iter().find(|p| p.name() == name),
        }
    }

    /// Whether the property is a number (compared numerically with a
    /// number value) rather than a string.
    pub fn is_numeric(self) -> bool {
        matches!(
            self,
            Property::HostMemoryTotalBytes
                | Property::HostMemoryUsedBytes
                | Property::HostSwapTotalBytes
                | Property::HostSwapUsedBytes
                | Property::HostCpuLoadAverageOneMinute
                | Property::HostCpuLoadAverageFiveMinutes
                | Property::HostCpuLoadAverageFifteenMinutes
                | Property::HostCpuInfoNumberOfCpus
                | Property::HostCpuInfoPhysicalCoresPerCpu
        )
    }

    fn resolve(self, server: &ServerRecord) -> Option<Actual<'_>> {
        let d = &server.description;
        let host = &d.host;
        fn text(s: &str) -> Actual<'_> {
            Actual::Text(Cow::Borrowed(s))
        }
        Some(match self {
            Property::Id => text(&server.id),
            Property::Hostname => text(&d.hostname),
            Property::Version => text(&d.version),
            Property::SessionManagerAgentVersion => text(&d.agent_version),
            Property::HostOsBuildNumber => text(&host.os.build_number),
            Property::HostOsFamily => text(host.os.family.as_str()),
            Property::HostOsKernelVersion => text(&host.os.kernel_version),
            Property::HostOsName => text(&host.os.name),
            Property::HostOsVersion => text(&host.os.version),
            Property::HostMemoryTotalBytes => Actual::Integer(host.memory.total_bytes),
            Property::HostMemoryUsedBytes => Actual::Integer(host.memory.used_bytes),
            Property::HostSwapTotalBytes => Actual::Integer(host.swap.total_bytes),
            Property::HostSwapUsedBytes => Actual::Integer(host.swap.used_bytes),
            Property::HostCpuLoadAverageOneMinute => {
                Actual::Float(host.cpu_load_average.one_minute)
            }
            Property::HostCpuLoadAverageFiveMinutes => {
                Actual::Float(host.cpu_load_average.five_minutes)
            }
            Property::HostCpuLoadAverageFifteenMinutes => {
                Actual::Float(host.cpu_load_average.fifteen_minutes)
            }
            Property::HostAwsEc2InstanceId => text(&host.aws.as_ref()?.ec2_instance_id),
            Property::HostAwsEc2InstanceType => text(&host.aws.as_ref()?.ec2_instance_type),
            Property::HostAwsRegion => text(&host.aws.as_ref()?.region),
            Property::HostAwsEc2ImageId => text(&host.aws.as_ref()?.ec2_image_id),
            Property::HostCpuInfoArchitecture => text(&host.cpu_info.architecture),
            Property::HostCpuInfoModelName => text(&host.cpu_info.model_name),
            Property::HostCpuInfoNumberOfCpus => {
                Actual::Integer(i64::from(host.cpu_info.number_of_cpus))
            }
            Property::HostCpuInfoPhysicalCoresPerCpu => {
                Actual::Integer(i64::from(host.cpu_info.physical_cores_per_cpu))
            }
            Property::HostCpuInfoVendor => text(&host.cpu_info.vendor),
        })
    }
}

impl fmt::Display for Property {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An operand's value on one server.
enum Actual<'a> {
    Text(Cow<'a, str>),
    Integer(i64),
    Float(f32),
}

impl Actual<'_> {
    /// The text a string value or `:=` is compared with.
    fn text(&self) -> Cow<'_, str> {
        match self {
            Actual::Text(s) => Cow::Borrowed(s.as_ref()),
            Actual::Integer(i) => Cow::Owned(i.to_string()),
            Actual::Float(x) => Cow::Owned(x.to_string()),
        }
    }

    /// The number a number value is compared with; `None` for a string
    /// that is not one.
    fn number(&self) -> Option<f64> {
        match self {
            Actual::Text(s) => number_value(s),
            // Exact up to 2^53; memory sizes are far below.
            Actual::Integer(i) => Some(*i as f64),
            // Through the shortest decimal form, so that a reported 0.1
            // equals the literal 0.1 rather than 0.100000001490116.
            Actual::Float(x) => x.to_string().parse().ok(),
        }
    }
}

/// Whether a tag key can be printed without quotes and read back as the
/// same key.
fn is_bare_key(key: &str) -> bool {
    !key.is_empty() && !key.contains(":=") && !key.chars().any(ends_word)
}

fn write_quoted(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
    f.write_str("'")?;
    for (i, part) in s.split('\'').enumerate() {
        if i > 0 {
            f.write_str("''")?;
        }
        f.write_str(part)?;
    }
    f.write_str("'")
}

// ---------------------------------------------------------------------------
// Tokens.

/// Characters that end a word (besides the pair `:=`).
fn ends_word(c: char) -> bool {
    c.is_whitespace() || matches!(c, '(' | ')' | '\'' | '=' | '!' | '<' | '>')
}

#[derive(Debug, Clone, PartialEq)]
enum TokenKind {
    LParen,
    RParen,
    And,
    Or,
    Not,
    Op(Op),
    Str(String),
    Tag(String),
    /// `server:NAME`; the name is resolved by the parser so that an unknown
    /// one is reported in reading order.
    Server {
        name: String,
        name_position: usize,
    },
    /// Any other word: a number where a value is expected, an error
    /// elsewhere.
    Word(String),
}

#[derive(Debug, Clone)]
struct Token {
    kind: TokenKind,
    position: usize,
    /// The token's source text, shortened for messages.
    snippet: String,
}

/// Longest piece of the input quoted back in a message.
const SNIPPET_CHARS: usize = 40;

fn snippet(chars: &[char]) -> String {
    let mut s: String = chars.iter().take(SNIPPET_CHARS).collect();
    if chars.len() > SNIPPET_CHARS {
        s.push('…');
    }
    s
}

/// Splits the input into tokens, stopping at the first malformed one. The
/// error is kept apart and surfaces only if the parser reads that far, so
/// errors are reported in reading order.
fn tokenize(chars: &[char]) -> (Vec<Token>, Option<ParseError>) {
    let mut tokens = Vec::new();
    let mut i = 0;
    loop {
        while chars.get(i).is_some_and(|c| c.is_whitespace()) {
            i += 1;
        }
        let start = i;
        let Some(&c) = chars.get(i) else {
            return (tokens, None);
        };
        let next = chars.get(i + 1).copied();
        let (kind, end) = match (c, next) {
            ('(', _) => (TokenKind::LParen, i + 1),
            (')', _) => (TokenKind::RParen, i + 1),
            ('=', _) => (TokenKind::Op(Op::Eq), i + 1),
            ('!', Some('=')) => (TokenKind::Op(Op::Ne), i + 2),
            ('!', _) => {
                let error = ParseError::new(i, "expected '!=': '!' must be followed by '='");
                return (tokens, Some(error));
            }
            ('<', Some('=')) => (TokenKind::Op(Op::Le), i + 2),
            ('<', _) => (TokenKind::Op(Op::Lt), i + 1),
            ('>', Some('=')) => (TokenKind::Op(Op::Ge), i + 2),
            ('>', _) => (TokenKind::Op(Op::Gt), i + 1),
            (':', Some('=')) => (TokenKind::Op(Op::Contains), i + 2),
            ('\'', _) => match read_string(chars, i) {
                Ok((s, end)) => (TokenKind::Str(s), end),
                Err(error) => return (tokens, Some(error)),
            },
            _ => match read_word(chars, i) {
                Ok(word) => word,
                Err(error) => return (tokens, Some(error)),
            },
        };
        tokens.push(Token {
            kind,
            position: start,
            snippet: snippet(chars.get(start..end).unwrap_or_default()),
        });
        i = end;
    }
}

/// Reads the quoted string opening at `start`; returns it unescaped and
/// the offset just past its closing quote.
fn read_string(chars: &[char], start: usize) -> Result<(String, usize), ParseError> {
    let mut s = String::new();
    let mut i = start + 1;
    loop {
        match (chars.get(i), chars.get(i + 1)) {
            (Some('\''), Some('\'')) => {
                s.push('\'');
                i += 2;
            }
            (Some('\''), _) => return Ok((s, i + 1)),
            (Some(&c), _) => {
                s.push(c);
                i += 1;
            }
            (None, _) => {
                return Err(ParseError::new(
                    start,
                    "unterminated string: no closing quote (write a quote inside a string as '')",
                ));
            }
        }
    }
}

/// Reads the word starting at `start`: a keyword, an operand, or anything
/// else up to a word end.
fn read_word(chars: &[char], start: usize) -> Result<(TokenKind, usize), ParseError> {
    let mut end = start;
    while let Some(&c) = chars.get(end) {
        if ends_word(c) || (c == ':' && chars.get(end + 1) == Some(&'=')) {
            break;
        }
        end += 1;
    }
    let word: String = chars.get(start..end).unwrap_or_default().iter().collect();
    let kind = if word.eq_ignore_ascii_case("and") {
        TokenKind::And
    } else if word.eq_ignore_ascii_case("or") {
        TokenKind::Or
    } else if word.eq_ignore_ascii_case("not") {
        TokenKind::Not
    } else if let Some(key) = word.strip_prefix("tag:") {
        if !key.is_empty() {
            TokenKind::Tag(key.to_string())
        } else if chars.get(end) == Some(&'\'') {
            let (key, after) = read_string(chars, end)?;
            return Ok((TokenKind::Tag(key), after));
        } else {
            return Err(ParseError::new(
                end,
                "expected a tag key after 'tag:' (quote it if it has spaces: tag:'my key')",
            ));
        }
    } else if let Some(name) = word.strip_prefix("server:") {
        TokenKind::Server {
            name: name.to_string(),
            name_position: start + "server:".len(),
        }
    } else {
        TokenKind::Word(word)
    };
    Ok((kind, end))
}

// ---------------------------------------------------------------------------
// Parser: recursive descent, one level of recursion per `(`, loops for
// `and`, `or` and runs of `not`.

/// Parses without the length limit (the unit tests use it to show the
/// depth limit alone protects the stack).
fn parse_unbounded(text: &str) -> Result<Expr, ParseError> {
    let chars: Vec<char> = text.chars().collect();
    if chars.iter().all(|c| c.is_whitespace()) {
        return Err(ParseError::new(0, "empty expression"));
    }
    let (tokens, lex_error) = tokenize(&chars);
    let mut parser = Parser {
        tokens,
        next: 0,
        lex_error,
        end: chars.len(),
    };
    let expr = parser.or(0)?;
    match parser.peek()? {
        None => Ok(expr),
        Some(t) if t.kind == TokenKind::RParen => Err(ParseError::new(
            t.position,
            "unmatched ')': no '(' is open here",
        )),
        Some(t) => Err(ParseError::new(
            t.position,
            format!(
                "expected 'and', 'or' or the end of the expression, found '{}'",
                t.snippet
            ),
        )),
    }
}

struct Parser {
    tokens: Vec<Token>,
    next: usize,
    /// The malformed token that ended tokenizing, if any.
    lex_error: Option<ParseError>,
    /// The input's length in characters: where "unexpected end" points.
    end: usize,
}

impl Parser {
    fn peek(&self) -> Result<Option<&Token>, ParseError> {
        match (self.tokens.get(self.next), &self.lex_error) {
            (Some(t), _) => Ok(Some(t)),
            (None, Some(error)) => Err(error.clone()),
            (None, None) => Ok(None),
        }
    }

    fn take(&mut self) -> Result<Option<Token>, ParseError> {
        let token = self.peek()?.cloned();
        if token.is_some() {
            self.next += 1;
        }
        Ok(token)
    }

    fn eat(&mut self, kind: &TokenKind) -> Result<bool, ParseError> {
        let found = self.peek()?.is_some_and(|t| t.kind == *kind);
        if found {
            self.next += 1;
        }
        Ok(found)
    }

    fn or(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.and(depth)?;
        while self.eat(&TokenKind::Or)? {
            let right = self.and(depth)?;
            left = Expr::Or(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn and(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let mut left = self.not(depth)?;
        while self.eat(&TokenKind::And)? {
            let right = self.not(depth)?;
            left = Expr::And(Box::new(left), Box::new(right));
        }
        Ok(left)
    }

    fn not(&mut self, mut depth: usize) -> Result<Expr, ParseError> {
        let mut nots = 0;
        while let Some(t) = self.peek()? {
            if t.kind != TokenKind::Not {
                break;
            }
            depth = deeper(depth, t.position)?;
            nots += 1;
            self.next += 1;
        }
        let mut expr = self.primary(depth)?;
        for _ in 0..nots {
            expr = Expr::Not(Box::new(expr));
        }
        Ok(expr)
    }

    fn primary(&mut self, depth: usize) -> Result<Expr, ParseError> {
        let expected = "expected a comparison (tag:KEY or server:PROPERTY), 'not' or '('";
        let Some(token) = self.take()? else {
            return Err(ParseError::new(
                self.end,
                format!("unexpected end of expression: {expected}"),
            ));
        };
        let operand = match token.kind {
            TokenKind::LParen => {
                let inner = self.or(deeper(depth, token.position)?)?;
                return match self.take()? {
                    Some(t) if t.kind == TokenKind::RParen => Ok(inner),
                    Some(t) => Err(ParseError::new(
                        t.position,
                        format!(
                            "expected ')' to close the '(' at character {}, found '{}'",
                            token.position + 1,
                            t.snippet
                        ),
                    )),
                    None => Err(ParseError::new(
                        self.end,
                        format!(
                            "unexpected end of expression: missing ')' to close the '(' at character {}",
                            token.position + 1
                        ),
                    )),
                };
            }
            TokenKind::Tag(key) => Operand::Tag(key),
            TokenKind::Server {
                name,
                name_position,
            } => Operand::Server(property(&name, name_position)?),
            TokenKind::Word(word) => {
                return Err(unknown_operand(&word, token.position, &token.snippet));
            }
            TokenKind::Op(op) => {
                return Err(ParseError::new(
                    token.position,
                    format!("expected an operand (tag:KEY or server:PROPERTY) before '{op}'"),
                ));
            }
            TokenKind::Str(_) => {
                return Err(ParseError::new(
                    token.position,
                    format!("{expected}, found a string (a quoted tag key is written tag:'key')"),
                ));
            }
            TokenKind::RParen | TokenKind::And | TokenKind::Or | TokenKind::Not => {
                return Err(ParseError::new(
                    token.position,
                    format!("{expected}, found '{}'", token.snippet),
                ));
            }
        };
        self.comparison(operand, &token.snippet)
    }

    fn comparison(&mut self, operand: Operand, operand_text: &str) -> Result<Expr, ParseError> {
        let expected = "a comparison operator (=, !=, <, <=, >, >= or :=)";
        let op = match self.take()? {
            Some(Token {
                kind: TokenKind::Op(op),
                ..
            }) => op,
            Some(t) => {
                return Err(ParseError::new(
                    t.position,
                    format!(
                        "expected {expected} after '{operand_text}', found '{}'",
                        t.snippet
                    ),
                ));
            }
            None => {
                return Err(ParseError::new(
                    self.end,
                    format!(
                        "unexpected end of expression: expected {expected} after '{operand_text}'"
                    ),
                ));
            }
        };
        let expected = format!("a value after '{op}' (a 'quoted string' or a number)");
        let value = match self.take()? {
            Some(Token {
                kind: TokenKind::Str(s),
                ..
            }) => Value::Str(s),
            Some(Token {
                kind: TokenKind::Word(word),
                position,
                snippet,
            }) => match Number::parse(&word) {
                Some(n) => Value::Number(n),
                None if word.starts_with(|c: char| c.is_ascii_digit() || "+-.".contains(c)) => {
                    return Err(ParseError::new(
                        position,
                        format!(
                            "invalid number '{snippet}': expected digits with an optional sign, \
                             fraction and exponent, like 2, -1.5 or 1024E6"
                        ),
                    ));
                }
                None => {
                    return Err(ParseError::new(
                        position,
                        format!("expected {expected}, found '{snippet}'"),
                    ));
                }
            },
            Some(t) => {
                return Err(ParseError::new(
                    t.position,
                    format!("expected {expected}, found '{}'", t.snippet),
                ));
            }
            None => {
                return Err(ParseError::new(
                    self.end,
                    format!("unexpected end of expression: expected {expected}"),
                ));
            }
        };
        Ok(Expr::Compare(Comparison { operand, op, value }))
    }
}

/// One level deeper, or the error for going past [`MAX_DEPTH`] at the
/// `(` or `not` at `position`.
fn deeper(depth: usize, position: usize) -> Result<usize, ParseError> {
    if depth >= MAX_DEPTH {
        return Err(ParseError::new(
            position,
            format!("nested deeper than {MAX_DEPTH} levels of parentheses and 'not'"),
        ));
    }
    Ok(depth + 1)
}

fn property(name: &str, position: usize) -> Result<Property, ParseError> {
    if let Some(p) = Property::from_name(name) {
        return Ok(p);
    }
    if name.is_empty() {
        return Err(ParseError::new(
            position,
            "expected a server property after 'server:', like server:Host.Os.Family",
        ));
    }
    let shown = snippet(&name.chars().collect::<Vec<_>>());
    let hint = Property::ALL
        .into_iter()
        .find(|p| p.name().eq_ignore_ascii_case(name))
        .map(|p| format!("; names are case-sensitive: did you mean '{}'?", p.name()))
        .unwrap_or_default();
    Err(ParseError::new(
        position,
        format!("unknown server property '{shown}'{hint}"),
    ))
}

fn unknown_operand(word: &str, position: usize, shown_word: &str) -> ParseError {
    let message = match word.split_once(':') {
        Some((prefix, _)) if !prefix.is_empty() => {
            let shown = snippet(&prefix.chars().collect::<Vec<_>>());
            format!("unknown operand prefix '{shown}:': expected tag:KEY or server:PROPERTY")
        }
        _ => format!("expected an operand (tag:KEY or server:PROPERTY), found '{shown_word}'"),
    };
    ParseError::new(position, message)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Expr {
        match Requirements::parse(text) {
            Ok(r) => r.expr,
            Err(e) => panic!("{text:?} should parse: {e}"),
        }
    }

    fn error(text: &str) -> ParseError {
        match Requirements::parse(text) {
            Ok(r) => panic!("{text:?} should not parse, got {r:?}"),
            Err(e) => e,
        }
    }

    /// Asserts `text` fails at `position` with a message containing `needle`.
    #[track_caller]
    fn fails(text: &str, position: usize, needle: &str) {
        let e = error(text);
        assert_eq!(e.position, position, "{text:?}: {e}");
        assert!(e.message.contains(needle), "{text:?}: {e}");
    }

    fn tag(key: &str, op: Op, value: Value) -> Expr {
        Expr::Compare(Comparison {
            operand: Operand::Tag(key.into()),
            op,
            value,
        })
    }

    fn s(v: &str) -> Value {
        Value::Str(v.into())
    }

    fn n(v: &str) -> Value {
        Value::Number(Number::parse(v).expect("valid number"))
    }

    fn and(l: Expr, r: Expr) -> Expr {
        Expr::And(Box::new(l), Box::new(r))
    }

    fn or(l: Expr, r: Expr) -> Expr {
        Expr::Or(Box::new(l), Box::new(r))
    }

    fn not(e: Expr) -> Expr {
        Expr::Not(Box::new(e))
    }

    #[test]
    fn a_comparison() {
        assert_eq!(parse("tag:color = 'pink'"), tag("color", Op::Eq, s("pink")));
        assert_eq!(parse("tag:color='pink'"), tag("color", Op::Eq, s("pink")));
        assert_eq!(
            parse("  tag:color\t=\n'pink'  "),
            tag("color", Op::Eq, s("pink"))
        );
    }

    #[test]
    fn every_operator() {
        for op in Op::ALL {
            let text = format!("tag:a{}'x'", op.as_str());
            assert_eq!(parse(&text), tag("a", op, s("x")), "{text}");
            let text = format!("tag:a {} 1", op.as_str());
            assert_eq!(parse(&text), tag("a", op, n("1")), "{text}");
        }
    }

    #[test]
    fn colons_in_keys_and_the_contains_operator() {
        assert_eq!(
            parse("tag:dcv:os-family = 'linux'"),
            tag("dcv:os-family", Op::Eq, s("linux"))
        );
        assert_eq!(parse("tag:a:b:='x'"), tag("a:b", Op::Contains, s("x")));
        assert_eq!(parse("tag:a: = 'x'"), tag("a:", Op::Eq, s("x")));
        fails("tag::='x'", 4, "expected a tag key after 'tag:'");
    }

    #[test]
    fn quoted_keys_and_escapes() {
        assert_eq!(parse("tag:'my key' = 'x'"), tag("my key", Op::Eq, s("x")));
        assert_eq!(parse("tag:'it''s' = 'x'"), tag("it's", Op::Eq, s("x")));
        assert_eq!(parse("tag:'' = 'x'"), tag("", Op::Eq, s("x")));
        assert_eq!(parse("tag:a = 'o''neil'"), tag("a", Op::Eq, s("o'neil")));
        assert_eq!(parse("tag:a = ''''"), tag("a", Op::Eq, s("'")));
        assert_eq!(parse("tag:a = ''"), tag("a", Op::Eq, s("")));
        assert_eq!(
            parse("tag:a = 'two\nlines'"),
            tag("a", Op::Eq, s("two\nlines"))
        );
        assert_eq!(parse("tag:a = 'ünï'"), tag("a", Op::Eq, s("ünï")));
    }

    #[test]
    fn numbers() {
        for text in ["2", "-1", "+3", "0.5", "1024E6", "2.5e-3", "1e+9", "007"] {
            assert_eq!(
                parse(&format!("tag:a = {text}")),
                tag("a", Op::Eq, n(text)),
                "{text}"
            );
        }
        assert_eq!(Number::parse("1024E6").map(|n| n.value()), Some(1.024e9));
        assert_eq!(Number::parse("2.5e-3").map(|n| n.value()), Some(0.0025));
        assert_eq!(
            Number::parse("1e999").map(|n| n.value()),
            Some(f64::INFINITY)
        );
        let huge = format!("1e{}", "9".repeat(100));
        assert_eq!(Number::parse(&huge).map(|n| n.value()), Some(f64::INFINITY));
        let tiny = format!("1e-{}", "9".repeat(100));
        assert_eq!(Number::parse(&tiny).map(|n| n.value()), Some(0.0));
        let long = "9".repeat(4000);
        assert!(Number::parse(&long).is_some_and(|n| n.value() == f64::INFINITY));
        for bad in [
            "", "-", "+", ".5", "5.", "1e", "1e+", "--1", "1x", "1.2.3", "inf", "NaN", " 1", "1 ",
            "0x10", "1_000",
        ] {
            assert_eq!(Number::parse(bad), None, "{bad:?}");
        }
        // A number runs to a word end: `1)` is fine, `1and` is not.
        assert_eq!(parse("(tag:a=1)"), tag("a", Op::Eq, n("1")));
        fails("tag:a = 1and tag:b = 2", 8, "invalid number '1and'");
    }

    #[test]
    fn keywords_are_case_insensitive_whole_words() {
        let a = || tag("a", Op::Eq, s("x"));
        let b = || tag("b", Op::Eq, s("y"));
        assert_eq!(parse("tag:a='x' AND tag:b='y'"), and(a(), b()));
        assert_eq!(parse("tag:a='x' Or tag:b='y'"), or(a(), b()));
        assert_eq!(parse("NOT tag:a='x'"), not(a()));
        assert_eq!(parse("not(tag:a='x')"), not(a()));
        assert_eq!(parse("(tag:a='x')and(tag:b='y')"), and(a(), b()));
        assert_eq!(parse("tag:a='x'and tag:b='y'"), and(a(), b()));
        // Keys that begin with or are keywords stay keys.
        assert_eq!(parse("tag:android = 'x'"), tag("android", Op::Eq, s("x")));
        assert_eq!(parse("tag:and = 'x'"), tag("and", Op::Eq, s("x")));
        assert_eq!(parse("tag:not = 'x'"), tag("not", Op::Eq, s("x")));
        fails("notable = 'x'", 0, "expected an operand");
        fails("nottag:a = 'x'", 0, "unknown operand prefix 'nottag:'");
    }

    #[test]
    fn precedence_and_associativity() {
        let a = || tag("a", Op::Eq, n("1"));
        let b = || tag("b", Op::Eq, n("2"));
        let c = || tag("c", Op::Eq, n("3"));
        assert_eq!(
            parse("tag:a=1 or tag:b=2 and tag:c=3"),
            or(a(), and(b(), c()))
        );
        assert_eq!(
            parse("tag:a=1 and tag:b=2 or tag:c=3"),
            or(and(a(), b()), c())
        );
        assert_eq!(parse("not tag:a=1 and tag:b=2"), and(not(a()), b()));
        assert_eq!(parse("not (tag:a=1 and tag:b=2)"), not(and(a(), b())));
        assert_eq!(parse("not not tag:a=1"), not(not(a())));
        assert_eq!(
            parse("tag:a=1 and tag:b=2 and tag:c=3"),
            and(and(a(), b()), c())
        );
        assert_eq!(
            parse("tag:a=1 and (tag:b=2 and tag:c=3)"),
            and(a(), and(b(), c()))
        );
        assert_eq!(
            parse("tag:a=1 or tag:b=2 or tag:c=3"),
            or(or(a(), b()), c())
        );
        assert_eq!(parse("((((tag:a=1))))"), a());
    }

    #[test]
    fn properties() {
        for p in Property::ALL {
            assert_eq!(Property::from_name(p.name()), Some(p));
            let text = format!("server:{} = 'x'", p.name());
            assert_eq!(
                parse(&text),
                Expr::Compare(Comparison {
                    operand: Operand::Server(p),
                    op: Op::Eq,
                    value: s("x"),
                })
            );
        }
        for (wire, p) in [
            ("EC2InstanceId", Property::HostAwsEc2InstanceId),
            ("EC2InstanceType", Property::HostAwsEc2InstanceType),
            ("EC2ImageId", Property::HostAwsEc2ImageId),
        ] {
            assert_eq!(Property::from_name(&format!("Host.Aws.{wire}")), Some(p));
        }
        let numeric = Property::ALL.iter().filter(|p| p.is_numeric()).count();
        assert_eq!(numeric, 9);
    }

    #[test]
    fn error_empty() {
        fails("", 0, "empty expression");
        fails(" \t\n ", 0, "empty expression");
    }

    #[test]
    fn error_unexpected_end() {
        fails(
            "tag:a = 'x' and",
            15,
            "unexpected end of expression: expected a comparison",
        );
        fails("not", 3, "unexpected end of expression");
        fails("tag:a = 'x' or ", 15, "unexpected end of expression");
    }

    #[test]
    fn error_unterminated_string() {
        fails("tag:a = 'pink", 8, "unterminated string");
        fails("tag:a = 'it''s", 8, "unterminated string");
        // The quoted key swallows ` = `; the stray quote after `x` opens
        // a string that never ends.
        fails("tag:'key = 'x'", 12, "after 'tag:'key = '', found 'x'");
        fails("tag:'key", 4, "unterminated string");
    }

    #[test]
    fn errors_are_reported_in_reading_order() {
        // The missing operator comes before the unterminated string.
        fails("tag:a tag:b = 'x", 6, "expected a comparison operator");
        // The unknown property comes before the lone '!'.
        fails("server:Nope ! 'x'", 7, "unknown server property");
    }

    #[test]
    fn error_unknown_operand() {
        fails(
            "color = 'pink'",
            0,
            "expected an operand (tag:KEY or server:PROPERTY), found 'color'",
        );
        fails("tags:color = 'pink'", 0, "unknown operand prefix 'tags:'");
        fails("Tag:color = 'pink'", 0, "unknown operand prefix 'Tag:'");
        fails("tag:a = 'x' and 42 = 1", 16, "found '42'");
        fails("'color' = 'pink'", 0, "found a string");
        fails(
            "= 'pink'",
            0,
            "expected an operand (tag:KEY or server:PROPERTY) before '='",
        );
        fails(":= 'pink'", 0, "before ':='");
        fails("tag: = 'x'", 4, "expected a tag key after 'tag:'");
        fails("tag:", 4, "expected a tag key after 'tag:'");
    }

    #[test]
    fn error_unknown_property() {
        fails(
            "server:Host.Gpus = 'x'",
            7,
            "unknown server property 'Host.Gpus'",
        );
        fails(
            "tag:a = 'x' or server:host.os.family = 'linux'",
            22,
            "did you mean 'Host.Os.Family'?",
        );
        fails("server: = 'x'", 7, "expected a server property");
        fails("server:'Id' = 'x'", 7, "expected a server property");
        let long = format!("server:{} = 1", "X".repeat(1000));
        let e = error(&long);
        assert_eq!(e.position, 7);
        assert!(e.message.len() < 200, "{e}");
    }

    #[test]
    fn error_missing_operator() {
        fails(
            "tag:a 'x'",
            6,
            "expected a comparison operator (=, !=, <, <=, >, >= or :=) after 'tag:a', found ''x''",
        );
        fails(
            "tag:a",
            5,
            "unexpected end of expression: expected a comparison operator",
        );
        fails(
            "server:Id and tag:b = 'x'",
            10,
            "after 'server:Id', found 'and'",
        );
        fails("tag:a ! 'x'", 6, "expected '!='");
        fails("tag:a =! 'x'", 7, "expected '!='");
    }

    #[test]
    fn error_missing_value() {
        fails(
            "tag:a =",
            7,
            "unexpected end of expression: expected a value after '='",
        );
        fails(
            "tag:a = and tag:b = 'y'",
            8,
            "expected a value after '=' (a 'quoted string' or a number), found 'and'",
        );
        fails("tag:a = pink", 8, "expected a value after '='");
        fails("tag:a <> 'x'", 7, "expected a value after '<'");
        fails("tag:a = = 'x'", 8, "expected a value after '='");
        fails("tag:a := )", 9, "expected a value after ':='");
        fails("tag:a = 1e", 8, "invalid number '1e'");
        fails("tag:a = .5", 8, "invalid number");
        fails("tag:a = - 1", 8, "invalid number '-'");
    }

    #[test]
    fn error_unbalanced_parentheses() {
        fails(
            "(tag:a = 'x'",
            12,
            "missing ')' to close the '(' at character 1",
        );
        fails(
            "((tag:a = 'x')",
            14,
            "missing ')' to close the '(' at character 1",
        );
        fails("tag:a = 'x')", 11, "unmatched ')'");
        fails("(tag:a = 'x'))", 13, "unmatched ')'");
        fails(
            "()",
            1,
            "expected a comparison (tag:KEY or server:PROPERTY), 'not' or '(', found ')'",
        );
        fails(
            "(tag:a = 'x' tag:b = 'y')",
            13,
            "expected ')' to close the '(' at character 1, found 'tag:b'",
        );
        fails(")", 0, "found ')'");
    }

    #[test]
    fn error_trailing_input() {
        fails(
            "tag:a = 'x' tag:b = 'y'",
            12,
            "expected 'and', 'or' or the end of the expression, found 'tag:b'",
        );
        fails("tag:a = 'x' 'y'", 12, "found ''y''");
        fails("tag:a = 1 2", 10, "found '2'");
        fails("tag:a = 'x' not tag:b = 'y'", 12, "found 'not'");
    }

    #[test]
    fn error_too_long() {
        let ok = format!("tag:a = '{}'", "x".repeat(MAX_EXPRESSION_CHARS - 10));
        assert_eq!(ok.chars().count(), MAX_EXPRESSION_CHARS);
        assert!(Requirements::parse(&ok).is_ok());
        let long = format!("tag:a = '{}'", "x".repeat(MAX_EXPRESSION_CHARS - 9));
        fails(&long, MAX_EXPRESSION_CHARS, "longer than 4096 characters");
        // Characters, not bytes.
        let wide = format!("tag:a = '{}'", "é".repeat(MAX_EXPRESSION_CHARS - 10));
        assert!(Requirements::parse(&wide).is_ok());
        fails(&"(".repeat(100_000), MAX_EXPRESSION_CHARS, "longer than");
    }

    #[test]
    fn error_too_deep() {
        let at_limit = format!("{}tag:a=1{}", "(".repeat(MAX_DEPTH), ")".repeat(MAX_DEPTH));
        assert_eq!(parse(&at_limit), tag("a", Op::Eq, n("1")));
        let over = format!(
            "{}tag:a=1{}",
            "(".repeat(MAX_DEPTH + 1),
            ")".repeat(MAX_DEPTH + 1)
        );
        fails(&over, MAX_DEPTH, "nested deeper than 64 levels");
        let nots = format!("{}tag:a=1", "not ".repeat(MAX_DEPTH));
        assert!(Requirements::parse(&nots).is_ok());
        let nots = format!("{}tag:a=1", "not ".repeat(MAX_DEPTH + 1));
        fails(&nots, 4 * MAX_DEPTH, "nested deeper");
        // Parentheses and `not` share the budget.
        let mixed = format!("{}tag:a=1", "not (".repeat(MAX_DEPTH / 2 + 1));
        fails(&mixed, 5 * (MAX_DEPTH / 2), "nested deeper");
        // Sequential groups do not add up.
        let wide = vec!["(((tag:a=1)))"; 100].join(" and ");
        assert!(Requirements::parse(&wide).is_ok());
    }

    #[test]
    fn depth_limit_alone_protects_the_stack() {
        // Past the length limit, to show the depth limit stops the
        // recursion on its own.
        let parens = "(".repeat(100_000);
        let e = parse_unbounded(&parens).expect_err("too deep");
        assert_eq!(e.position, MAX_DEPTH);
        let nots = "not ".repeat(100_000);
        let e = parse_unbounded(&nots).expect_err("too deep");
        assert_eq!(e.position, 4 * MAX_DEPTH);
        let mixed = "not (".repeat(100_000);
        assert!(parse_unbounded(&mixed).is_err());
    }

    #[test]
    fn longest_chains_within_the_length_limit() {
        // `and`/`or` chains nest the tree without nesting the input; the
        // length limit bounds them (to about 300 levels), and evaluating,
        // printing and dropping such a tree stays cheap.
        for joiner in [" or ", " and "] {
            let unit = "tag:a = 1";
            let count = (MAX_EXPRESSION_CHARS + joiner.len()) / (unit.len() + joiner.len());
            let text = vec![unit; count].join(joiner);
            assert!(text.len() <= MAX_EXPRESSION_CHARS);
            let parsed = Requirements::parse(&text).expect("within limits");
            assert_eq!(parsed.to_string(), text);
        }
    }

    #[test]
    fn error_too_long_in_canonical_form() {
        // Within the limit as written, over it once spaced out.
        let unit = "tag:a=1";
        let count = MAX_EXPRESSION_CHARS / (unit.len() + 4);
        let text = vec![unit; count].join(" or ");
        assert!(text.len() <= MAX_EXPRESSION_CHARS);
        fails(
            &text,
            0,
            "longer than 4096 characters once written in canonical form",
        );
        // Exactly at the limit once spaced out is fine.
        let exact = format!("tag:a='{}'", "x".repeat(MAX_EXPRESSION_CHARS - 10));
        assert_eq!(
            Requirements::parse(&exact).map(|r| r.to_string().len()),
            Ok(4096)
        );
        let over = format!("tag:a='{}'", "x".repeat(MAX_EXPRESSION_CHARS - 9));
        assert!(over.len() < MAX_EXPRESSION_CHARS);
        fails(&over, 0, "canonical form");
    }

    #[test]
    fn display_of_a_made_up_error_position_does_not_overflow() {
        let e = ParseError::new(usize::MAX, "x");
        assert_eq!(e.to_string(), format!("at character {}: x", usize::MAX));
    }

    #[test]
    fn display_is_canonical() {
        let cases = [
            ("tag:color='pink'", "tag:color = 'pink'"),
            ("tag:a=1 AND NOT tag:b=2", "tag:a = 1 and not tag:b = 2"),
            (
                "((tag:a=1) or (tag:b=2)) and tag:c=3",
                "(tag:a = 1 or tag:b = 2) and tag:c = 3",
            ),
            (
                "tag:a=1 and (tag:b=2 and tag:c=3)",
                "tag:a = 1 and (tag:b = 2 and tag:c = 3)",
            ),
            (
                "(tag:a=1 and tag:b=2) and tag:c=3",
                "tag:a = 1 and tag:b = 2 and tag:c = 3",
            ),
            (
                "tag:a=1 or (tag:b=2 or tag:c=3)",
                "tag:a = 1 or (tag:b = 2 or tag:c = 3)",
            ),
            (
                "(tag:a=1 and tag:b=2) or tag:c=3",
                "tag:a = 1 and tag:b = 2 or tag:c = 3",
            ),
            ("not (not tag:a=1)", "not not tag:a = 1"),
            ("not (tag:a=1 or tag:b=2)", "not (tag:a = 1 or tag:b = 2)"),
            ("tag:'my key'='o''neil'", "tag:'my key' = 'o''neil'"),
            ("tag:'plain'=1024E6", "tag:plain = 1024E6"),
            ("tag:'a:=b' := +2.50", "tag:'a:=b' := +2.50"),
            ("tag:''=''", "tag:'' = ''"),
            (
                "server:Host.Aws.EC2InstanceType:='t2'",
                "server:Host.Aws.Ec2InstanceType := 't2'",
            ),
        ];
        for (input, canonical) in cases {
            let parsed = Requirements::parse(input).expect(input);
            assert_eq!(parsed.to_string(), canonical, "{input}");
            assert_eq!(Requirements::parse(canonical), Ok(parsed), "{canonical}");
        }
    }

    #[test]
    fn error_display_counts_from_one() {
        let e = error("tag:color = ");
        assert_eq!(e.position, 12);
        assert_eq!(
            e.to_string(),
            "at character 13: unexpected end of expression: expected a value after '=' (a 'quoted string' or a number)"
        );
        let e = error("tag:é = ");
        assert_eq!(e.position, 8, "characters, not bytes");
    }
}
