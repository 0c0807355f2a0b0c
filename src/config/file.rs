//! The broker's configuration file (`--config PATH`, TOML): every flag of
//! [`Args`] is a key, spelled as the flag without its dashes, `-` as `_`
//! (`--tls-cert` is `tls_cert`). The keys are not listed anywhere: they are
//! read off clap's own description of the flags, and each value is parsed
//! by handing it to clap as the flag it stands for, so a flag added later
//! is a key at once, validated exactly as on the command line.
//!
//! Precedence: a flag given on the command line, then its environment
//! variable, then the file, then the flag's default. A file key whose flag
//! conflicts with one given on the command line or in the environment
//! (`data_dir` in the file, `--in-memory` given) yields to it.

use std::{
    ffi::{OsStr, OsString},
    io::Read,
    path::Path,
};

use clap::{Arg, ArgAction, ArgMatches, CommandFactory, FromArgMatches, parser::ValueSource};

use super::Args;

/// The flag naming the file; not a key itself.
const CONFIG_ID: &str = "config";

/// A configuration file is a page of settings: anything larger is not one.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Parses the broker's command line (exiting on a malformed one, as clap
/// does, or with --help), then, when it serves (no subcommand) and a file
/// is named (--config or DCV_BROKER_CONFIG), takes from the file every
/// setting the command line and environment leave unset.
pub fn parse(argv: Vec<OsString>) -> Result<Args, String> {
    let matches = Args::command().get_matches_from(argv.clone());
    let args = Args::from_arg_matches(&matches).map_err(|e| first_line(&e.to_string()))?;
    match (&args.command, &args.config) {
        (None, Some(path)) => with_file(argv, &matches, path).map(|(args, _)| args),
        _ => Ok(args),
    }
}

/// `dcv-broker config check`: the settings the broker would start with
/// from this file and the current environment, checked as at a start, and
/// listed with where each came from (itself a configuration file).
pub fn check(path: &Path) -> Result<String, String> {
    let argv = vec![OsString::from("dcv-broker")];
    let matches = Args::command()
        .try_get_matches_from(argv.clone())
        .map_err(|e| first_line(&e.to_string()))?;
    let (args, matches) = with_file(argv, &matches, path)?;
    args.check()
        .map_err(|e| format!("config file {}: {e}", path.display()))?;
    // Nothing was on the command line: what clap took from it came from
    // the file.
    Ok(effective(&matches, "file"))
}

/// Every setting in `matches`, as a TOML line with its origin (the
/// command line's called `command_line`); unset ones commented out,
/// secrets hidden.
fn effective(matches: &ArgMatches, command_line: &str) -> String {
    let command = Args::command();
    let mut out = String::new();
    for arg in settings(&command) {
        let Some(key) = key_of(arg) else { continue };
        let id = arg.get_id().as_str();
        let values: Vec<String> = match matches.get_raw(id) {
            Some(_) if arg.is_hide_env_values_set() => vec![toml_value(OsStr::new("<secret>"))],
            Some(raw) => raw.map(toml_value).collect(),
            None => Vec::new(),
        };
        let origin = match matches.value_source(id) {
            Some(ValueSource::CommandLine) => command_line,
            Some(ValueSource::EnvVariable) => "environment",
            Some(ValueSource::DefaultValue) => "default",
            _ => "unset",
        };
        let line = match (values.as_slice(), arg.get_action()) {
            ([], _) => format!("#{key} ="),
            (values, ArgAction::Append) => format!("{key} = [{}]", values.join(", ")),
            ([value], _) => format!("{key} = {value}"),
            (values, _) => format!("{key} = [{}]", values.join(", ")),
        };
        out.push_str(&format!("{line:<50} # {origin}\n"));
    }
    out
}

/// `argv` (already parsed into `matches`) with the file's settings for
/// every flag `matches` did not take from the command line or environment.
fn with_file(
    argv: Vec<OsString>,
    matches: &ArgMatches,
    path: &Path,
) -> Result<(Args, ArgMatches), String> {
    let failed = |message: String| format!("config file {}: {message}", path.display());
    let table = read(path).map_err(failed)?;
    let command = Args::command();
    let settings: Vec<&Arg> = settings(&command).collect();
    let mut extra = Vec::new();
    for (key, value) in &table {
        let arg = find(&settings, key).ok_or_else(|| failed(unknown_key(key, &settings)))?;
        let words = words(arg, value).map_err(|e| failed(format!("key {key:?}: {e}")))?;
        // Each value alone first, so that a bad one is named by its key.
        let mut alone = argv[..1].to_vec();
        alone.extend(words.iter().cloned());
        if let Err(e) = command.clone().try_get_matches_from(alone)
            && let Some(why) = value_error(&e, arg)
        {
            return Err(failed(format!("key {key:?}: {why}")));
        }
        if !given(matches, arg) && !overruled(&command, matches, arg) {
            extra.extend(words);
        }
    }
    // A secret's flag hides its environment value from --help.
    let secrets: Vec<&str> = table
        .keys()
        .filter(|key| find(&settings, key).is_some_and(Arg::is_hide_env_values_set))
        .map(String::as_str)
        .collect();
    if !secrets.is_empty() {
        private(path, &secrets.join(", ")).map_err(failed)?;
    }
    let mut all = argv;
    all.extend(extra);
    let matches = command
        .try_get_matches_from(all)
        .map_err(|e| failed(first_line(&e.to_string())))?;
    let args = Args::from_arg_matches(&matches).map_err(|e| failed(first_line(&e.to_string())))?;
    Ok((args, matches))
}

/// The file as a TOML table, bounded before it is read.
fn read(path: &Path) -> Result<toml::Table, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("cannot read it: {e}"))?;
    let mut text = String::new();
    file.take(MAX_FILE_BYTES + 1)
        .read_to_string(&mut text)
        .map_err(|e| format!("cannot read it: {e}"))?;
    if text.len() as u64 > MAX_FILE_BYTES {
        return Err(format!("larger than {MAX_FILE_BYTES} bytes"));
    }
    text.parse().map_err(|e: toml::de::Error| {
        let line = e
            .span()
            .map(|span| text[..span.start].matches('\n').count() + 1);
        match line {
            Some(line) => format!("line {line}: not valid TOML: {}", one_line(e.message())),
            None => format!("not valid TOML: {}", one_line(e.message())),
        }
    })
}

/// The flags a file may set: every one but help, version and --config.
fn settings(command: &clap::Command) -> impl Iterator<Item = &Arg> {
    command.get_arguments().filter(|arg| {
        arg.get_id() != CONFIG_ID
            && arg.get_long().is_some()
            && matches!(
                arg.get_action(),
                ArgAction::Set | ArgAction::Append | ArgAction::SetTrue | ArgAction::SetFalse
            )
    })
}

/// The file's key for `arg`: its long name, `-` as `_`.
fn key_of(arg: &Arg) -> Option<String> {
    arg.get_long().map(|long| long.replace('-', "_"))
}

fn find<'a>(settings: &[&'a Arg], key: &str) -> Option<&'a Arg> {
    settings
        .iter()
        .copied()
        .find(|arg| key_of(arg).as_deref() == Some(key))
}

fn unknown_key(key: &str, settings: &[&Arg]) -> String {
    let respelled = key.replace('-', "_");
    if respelled != key && find(settings, &respelled).is_some() {
        return format!("unknown key {key:?} (keys are spelled with _: {respelled})");
    }
    if key == CONFIG_ID {
        return format!("unknown key {key:?} (a configuration file cannot name another)");
    }
    format!("unknown key {key:?} (`dcv-broker config defaults` lists every key)")
}

/// `value` as the command-line words that give it to `arg`.
fn words(arg: &Arg, value: &toml::Value) -> Result<Vec<OsString>, String> {
    let long = arg.get_long().unwrap_or_default();
    match (arg.get_action(), value) {
        (ArgAction::SetTrue, toml::Value::Boolean(on))
        | (ArgAction::SetFalse, toml::Value::Boolean(on)) => {
            // A switch is only ever turned away from its default.
            let flips = matches!(arg.get_action(), ArgAction::SetTrue) == *on;
            Ok(if flips {
                vec![format!("--{long}").into()]
            } else {
                Vec::new()
            })
        }
        (ArgAction::SetTrue | ArgAction::SetFalse, _) => Err("expected true or false".into()),
        (ArgAction::Append, toml::Value::Array(items)) => items
            .iter()
            .map(|item| scalar(item).map(|text| format!("--{long}={text}").into()))
            .collect(),
        (_, toml::Value::Array(_)) => Err("expected one value, not a list".into()),
        (_, value) => Ok(vec![format!("--{long}={}", scalar(value)?).into()]),
    }
}

/// A TOML value as the text a flag would be given.
fn scalar(value: &toml::Value) -> Result<String, String> {
    match value {
        toml::Value::String(text) => Ok(text.clone()),
        toml::Value::Integer(n) => Ok(n.to_string()),
        toml::Value::Float(x) => Ok(x.to_string()),
        toml::Value::Boolean(b) => Ok(b.to_string()),
        toml::Value::Datetime(at) => Ok(at.to_string()),
        toml::Value::Array(_) | toml::Value::Table(_) => {
            Err("expected a string, a number or a boolean".into())
        }
    }
}

/// Whether the command line or the environment already set `arg`.
fn given(matches: &ArgMatches, arg: &Arg) -> bool {
    matches!(
        matches.value_source(arg.get_id().as_str()),
        Some(ValueSource::CommandLine | ValueSource::EnvVariable)
    )
}

/// Whether a flag given on the command line or in the environment
/// conflicts with `arg`: the file's `arg` then yields to it.
fn overruled(command: &clap::Command, matches: &ArgMatches, arg: &Arg) -> bool {
    settings(command).any(|other| {
        given(matches, other)
            && (command
                .get_arg_conflicts_with(other)
                .iter()
                .any(|c| c.get_id() == arg.get_id())
                || command
                    .get_arg_conflicts_with(arg)
                    .iter()
                    .any(|c| c.get_id() == other.get_id()))
    })
}

/// What is wrong with `arg`'s value, if `error` is about it (and not, say,
/// about a flag it requires, which the whole file may yet give). A secret's
/// value is never repeated.
fn value_error(error: &clap::Error, arg: &Arg) -> Option<String> {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let quoted = |e: &clap::Error| match e.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(v)) if !arg.is_hide_env_values_set() => format!("{v:?}"),
        _ => "the value".to_owned(),
    };
    match error.kind() {
        ErrorKind::ValueValidation => {
            let why = std::error::Error::source(error)
                .map(|e| one_line(&e.to_string()))
                .unwrap_or_else(|| first_line(&error.to_string()));
            Some(format!("invalid value {}: {why}", quoted(error)))
        }
        ErrorKind::InvalidValue => {
            let valid = match error.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(values)) => values.join(", "),
                _ => String::new(),
            };
            Some(if valid.is_empty() {
                format!("invalid value {}", quoted(error))
            } else {
                format!("invalid value {}: expected one of {valid}", quoted(error))
            })
        }
        ErrorKind::MissingRequiredArgument | ErrorKind::ArgumentConflict => None,
        _ => Some(first_line(&error.to_string())),
    }
}

/// A file holding a secret must be its owner's alone: refused otherwise,
/// as the agent refuses its secret files (a secret others can read has
/// leaked already).
#[cfg(unix)]
fn private(path: &Path, secrets: &str) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| format!("cannot read it: {e}"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        return Err(format!(
            "key {secrets:?} is a secret, but the file is readable by group or \
             others (mode {:o}); chmod 600 it",
            mode & 0o777
        ));
    }
    Ok(())
}

#[cfg(not(unix))]
fn private(_path: &Path, _secrets: &str) -> Result<(), String> {
    Ok(())
}

/// `dcv-broker config defaults`: a configuration file setting every key to
/// its default, each under its flag's help; keys without a default are
/// commented out, with a placeholder.
pub fn defaults() -> String {
    let mut command = Args::command();
    // Built, clap gives switches their default (false).
    command.build();
    let mut out = String::from(
        "# dcv-broker configuration file: `dcv-broker --config FILE` (or DCV_BROKER_CONFIG).\n\
         # Every key is a flag of `dcv-broker --help`, `-` written `_`; a flag given on the\n\
         # command line, or its environment variable, overrides the key. A file that sets\n\
         # database_url must be readable by its owner only (chmod 600).\n",
    );
    for arg in settings(&command) {
        let (Some(key), Some(long)) = (key_of(arg), arg.get_long()) else {
            continue;
        };
        out.push('\n');
        let help = arg
            .get_long_help()
            .or(arg.get_help())
            .map(ToString::to_string)
            .unwrap_or_default();
        for paragraph in help.split("\n\n") {
            // clap drops the full stop of a one-paragraph help.
            match paragraph.trim_end().ends_with(['.', ':']) {
                true => comment(&mut out, paragraph),
                false => comment(&mut out, &format!("{}.", paragraph.trim_end())),
            }
        }
        if !matches!(arg.get_action(), ArgAction::SetTrue | ArgAction::SetFalse) {
            let values: Vec<String> = arg
                .get_possible_values()
                .iter()
                .filter(|v| !v.is_hide_set())
                .map(|v| match v.get_help() {
                    Some(help) => {
                        format!("\"{}\", {}", v.get_name(), lower_first(&help.to_string()))
                    }
                    None => format!("\"{}\"", v.get_name()),
                })
                .collect();
            if !values.is_empty() {
                let values = values.join("; ");
                comment(
                    &mut out,
                    &format!("One of {}.", values.trim_end_matches('.')),
                );
            }
        }
        let env = arg
            .get_env()
            .map(|env| format!("; environment: {}", env.to_string_lossy()))
            .unwrap_or_default();
        comment(&mut out, &format!("Flag: --{long}{env}."));
        let multiple = matches!(arg.get_action(), ArgAction::Append);
        let default: Vec<String> = arg
            .get_default_values()
            .iter()
            .map(|v| toml_value(v))
            .collect();
        match (default.as_slice(), multiple) {
            ([], _) => {
                let placeholder = arg
                    .get_value_names()
                    .and_then(|names| names.first())
                    .map_or_else(|| "VALUE".to_owned(), ToString::to_string);
                let placeholder = toml_value(OsStr::new(&placeholder));
                if multiple {
                    out.push_str(&format!("#{key} = [{placeholder}]\n"));
                } else {
                    out.push_str(&format!("#{key} = {placeholder}\n"));
                }
            }
            (values, true) => out.push_str(&format!("{key} = [{}]\n", values.join(", "))),
            ([value], false) => out.push_str(&format!("{key} = {value}\n")),
            (values, false) => out.push_str(&format!("{key} = [{}]\n", values.join(", "))),
        }
    }
    out
}

/// A default as a TOML value: a number or a boolean as such, anything
/// else a string (every key takes a string too).
fn toml_value(text: &OsStr) -> String {
    let text = text.to_string_lossy();
    if text.parse::<i64>().is_ok() || text == "true" || text == "false" {
        text.into_owned()
    } else {
        toml::Value::String(text.into_owned()).to_string()
    }
}

/// `text` as `# ` lines of at most 80 columns.
fn comment(out: &mut String, text: &str) {
    let mut line = String::from("#");
    for word in text.split_whitespace() {
        if line.len() > 1 && line.len() + 1 + word.len() > 80 {
            out.push_str(&line);
            out.push('\n');
            line = String::from("#");
        }
        line.push(' ');
        line.push_str(word);
    }
    if line.len() > 1 {
        out.push_str(&line);
        out.push('\n');
    }
}

fn lower_first(text: &str) -> String {
    let mut chars = text.chars();
    // An initialism (PNG) stays as it is.
    match (chars.next(), chars.next()) {
        (Some(first), Some(second)) if second.is_lowercase() => {
            first.to_lowercase().chain([second]).chain(chars).collect()
        }
        _ => text.to_owned(),
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A clap message on one line, without its `error: ` prefix, usage and
/// pointer to --help.
fn first_line(text: &str) -> String {
    let text = text.split("\n\n").next().unwrap_or_default();
    let text = one_line(text);
    text.strip_prefix("error: ").unwrap_or(&text).to_owned()
}
