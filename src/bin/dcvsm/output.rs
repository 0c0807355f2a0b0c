//! dcvsm's output: a reply as the protobuf JSON mapping (what grpcurl
//! prints), or as aligned tables for people.

use std::io::Write;

use dcv_broker::pb;
use prost::Message;
use prost_reflect::{DescriptorPool, DynamicMessage};
use serde_json::Value;

use crate::{
    Failure,
    cli::{Command, OutputFormat},
    exit, fail,
};

/// Prints `command`'s `reply` on stdout in `format`.
pub fn print(reply: &Value, format: OutputFormat, command: &Command) -> Result<(), Failure> {
    let text = match format {
        OutputFormat::Json => format!(
            "{}\n",
            serde_json::to_string_pretty(reply).expect("a Value always serializes")
        ),
        OutputFormat::Table if reply.get("DryRun") == Some(&Value::Bool(true)) => {
            dry_run_table(reply, command)
        }
        OutputFormat::Table => table(reply),
    };
    // A reader that stopped early (`| head`) is not an error worth a panic.
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => {
            return Err(fail(exit::OTHER, format!("writing the reply: {e}")));
        }
        _ => {}
    }
    Ok(())
}

/// The protobuf JSON mapping of a reply, as grpcurl prints it: through the
/// descriptor set, so the names are the proto's `json_name`s.
pub fn to_json<M: Message>(name: &str, message: &M) -> Result<Value, Failure> {
    static POOL: std::sync::OnceLock<DescriptorPool> = std::sync::OnceLock::new();
    let pool = POOL.get_or_init(|| {
        DescriptorPool::decode(pb::FILE_DESCRIPTOR_SET).expect("the built-in descriptor set")
    });
    let full_name = format!("dcv.sessionmanager.v1.{name}");
    let descriptor = pool
        .get_message_by_name(&full_name)
        .ok_or_else(|| fail(exit::OTHER, format!("no descriptor for {full_name}")))?;
    let dynamic = DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())
        .map_err(|e| fail(exit::OTHER, format!("re-decoding the reply: {e}")))?;
    // Through text, not `to_value`: a float field is an f32, printed by the
    // serializer as its shortest f32 form (2.83, as grpcurl prints it);
    // `to_value` would widen it to an f64 first (2.8299999237060547).
    let text =
        serde_json::to_string(&dynamic).map_err(|e| fail(exit::OTHER, format!("JSON: {e}")))?;
    serde_json::from_str(&text).map_err(|e| fail(exit::OTHER, format!("JSON: {e}")))
}

/// The header of a dry run's table output.
const DRY_RUN_HEADER: &str = "DRY RUN — nothing was changed";

/// A dry run's reply for people: what each item would do, the servers the
/// call would act on with the sessions on them, and AVAILABLE capacity
/// before and after, per pool and overall.
fn dry_run_table(reply: &Value, command: &Command) -> String {
    let empty = Vec::new();
    let list = |key: &str| reply.get(key).and_then(Value::as_array).unwrap_or(&empty);
    let text = |v: &Value, key: &str| v.get(key).and_then(scalar).unwrap_or_default();
    let mut out = format!("{DRY_RUN_HEADER}\n");
    if let Some(id) = reply.get("RequestId").and_then(scalar) {
        out.push_str(&format!("RequestId: {id}\n"));
    }

    let (succeeded, failed) = (list("SuccessfulList"), list("UnsuccessfulList"));
    out.push_str(&format!(
        "\nItems ({}): {} would succeed, {} would fail\n",
        succeeded.len() + failed.len(),
        succeeded.len(),
        failed.len()
    ));
    // The item's id: a failed server item's is in its echoed request data.
    let id = |item: &Value| {
        let data = ["CloseServerRequestData", "OpenServerRequestData"]
            .iter()
            .find_map(|key| item.get(*key))
            .unwrap_or(item);
        ["ServerId", "SessionId"]
            .iter()
            .find_map(|key| data.get(*key).and_then(scalar))
            .unwrap_or_default()
    };
    let rows = succeeded
        .iter()
        .map(|item| {
            // A deletion says the state it would leave the session in.
            let result = item
                .get("State")
                .and_then(scalar)
                .unwrap_or_else(|| "OK".into());
            [id(item), result, String::new()]
        })
        .chain(failed.iter().map(|item| {
            [
                id(item),
                text(item, "FailureCode"),
                text(item, "FailureReason"),
            ]
        }));
    out.push_str(&dcv_broker::table::aligned(
        ["Item", "Result", "Reason"],
        rows,
    ));

    let radius = reply.get("BlastRadius").unwrap_or(&Value::Null);
    let servers = radius
        .get("Servers")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    // Proto3 JSON leaves false out.
    let yes_no = |v: &Value, key: &str| {
        if v.get(key) == Some(&Value::Bool(true)) {
            "yes"
        } else {
            "no"
        }
    };
    out.push_str(&format!("\nAffected servers ({})\n", servers.len()));
    if servers.is_empty() {
        out.push_str("(none)\n");
    } else {
        let rows = servers.iter().map(|s| {
            let sessions = s
                .get("Sessions")
                .and_then(Value::as_array)
                .map_or(0, Vec::len);
            [
                text(s, "ServerId"),
                format!(
                    "{} → {}",
                    yes_no(s, "AvailableBefore"),
                    yes_no(s, "AvailableAfter")
                ),
                sessions.to_string(),
            ]
        });
        out.push_str(&dcv_broker::table::aligned(
            ["Server", "Available (before → after)", "Sessions"],
            rows,
        ));
    }

    let sessions_title = match command {
        Command::CloseServers(_) => Some("Sessions that would keep running on closed servers"),
        Command::DeleteSession(_) => Some("Sessions that would be deleted"),
        _ => None,
    };
    if let Some(title) = sessions_title {
        let sessions: Vec<[String; 4]> = servers
            .iter()
            .flat_map(|s| {
                let server = text(s, "ServerId");
                s.get("Sessions")
                    .and_then(Value::as_array)
                    .unwrap_or(&empty)
                    .iter()
                    .map(move |x| {
                        [
                            server.clone(),
                            text(x, "Id"),
                            text(x, "Owner"),
                            text(x, "Type"),
                        ]
                    })
            })
            .collect();
        out.push_str(&format!("\n{title} ({})\n", sessions.len()));
        if sessions.is_empty() {
            out.push_str("(none)\n");
        } else {
            out.push_str(&dcv_broker::table::aligned(
                ["Server", "Session", "Owner", "Type"],
                sessions,
            ));
        }
    }

    // Proto3 JSON leaves 0 out.
    let count = |pool: &Value, key: &str| pool.get(key).and_then(Value::as_i64).unwrap_or_default();
    let row = |name: String, pool: &Value| {
        let (before, after) = (
            count(pool, "AvailableBefore"),
            count(pool, "AvailableAfter"),
        );
        let change = match after - before {
            0 => "0".to_owned(),
            n => format!("{n:+}"),
        };
        [name, format!("{before} → {after}"), change]
    };
    let pools = radius
        .get("Pools")
        .and_then(Value::as_array)
        .unwrap_or(&empty);
    let rows = pools
        .iter()
        .map(|p| {
            let value = text(p, "TagValue");
            let value = if value.is_empty() {
                "(no tag)".to_owned()
            } else {
                value
            };
            row(format!("{}={value}", text(p, "TagKey")), p)
        })
        .chain(std::iter::once(row(
            "all servers".into(),
            radius.get("Overall").unwrap_or(&Value::Null),
        )));
    out.push_str("\nAVAILABLE capacity\n");
    out.push_str(&dcv_broker::table::aligned(
        ["Pool", "Before → after", "Change"],
        rows,
    ));
    out
}

/// A reply for people: its scalars as `Key: value` lines, then one aligned
/// table per list (or nested object), a column per field. Nested objects
/// are flattened one level as `Parent.Child`; lists of objects (a server's
/// Holds, Tags and Endpoints) and a server's Host are summed up in one
/// cell each, so that what the JSON says about a server fits on its row.
/// comfy-table measures the cells, wide characters included (a reason may
/// be in any script).
fn table(reply: &Value) -> String {
    let mut out = String::new();
    let Some(obj) = reply.as_object() else {
        return format!("{reply}\n");
    };
    for (key, value) in obj {
        if let Some(s) = scalar(value) {
            out.push_str(&format!("{key}: {s}\n"));
        }
    }
    // Proto3 JSON omits empty lists, so a reply with none says so.
    if !obj.values().any(|v| v.is_array() || v.is_object()) {
        out.push_str("\n(no items)\n");
    }
    for (key, value) in obj {
        let rows: Vec<&Value> = match value {
            Value::Array(items) => items.iter().collect(),
            Value::Object(_) => vec![value],
            _ => continue,
        };
        out.push_str(&format!("\n{key} ({})\n", rows.len()));
        let flat: Vec<Vec<(String, String)>> = rows.iter().map(|r| flatten(r)).collect();
        let mut columns: Vec<String> = Vec::new();
        for row in &flat {
            for (c, _) in row {
                if !columns.contains(c) {
                    columns.push(c.clone());
                }
            }
        }
        let cells = flat.iter().map(|row| {
            columns.iter().map(|c| {
                row.iter()
                    .find(|(k, _)| k == c)
                    .map(|(_, v)| v.clone())
                    .unwrap_or_default()
            })
        });
        out.push_str(&dcv_broker::table::aligned(columns.clone(), cells));
    }
    out
}

fn scalar(v: &Value) -> Option<String> {
    match v {
        Value::String(s) => Some(s.clone()),
        Value::Number(n) => Some(n.to_string()),
        Value::Bool(b) => Some(b.to_string()),
        _ => None,
    }
}

/// A field of `object` as text ("" if absent or not a scalar).
fn field(object: &serde_json::Map<String, Value>, key: &str) -> String {
    object.get(key).and_then(scalar).unwrap_or_default()
}

/// One element of a list of objects in a cell: a screenshot image as
/// "FILE (FORMAT, primary)", a hold as "[NAME] KIND by ACTOR at TIME until
/// EXPIRY: REASON", a
/// tag as "KEY=VALUE", an endpoint as "IP:PORT PROTOCOL PATH", anything
/// else as its "Key=value" scalars.
fn summary(item: &Value) -> String {
    let Some(o) = item.as_object() else {
        return scalar(item).unwrap_or_else(|| item.to_string());
    };
    if o.contains_key("Format") && o.contains_key("File") {
        let primary = if o.get("Primary") == Some(&Value::Bool(true)) {
            ", primary"
        } else {
            ""
        };
        return format!("{} ({}{primary})", field(o, "File"), field(o, "Format"));
    }
    if o.contains_key("Actor") || o.contains_key("CreationTime") {
        let mut text = String::new();
        let name = field(o, "Name");
        if !name.is_empty() {
            text.push_str(&format!("[{name}] "));
        }
        text.push_str(&format!(
            "{} by {} at {}",
            field(o, "Kind"),
            field(o, "Actor"),
            field(o, "CreationTime")
        ));
        let expiry = field(o, "ExpirationTime");
        if !expiry.is_empty() {
            text.push_str(&format!(" until {expiry}"));
        }
        let reason = field(o, "Reason");
        if !reason.is_empty() {
            text.push_str(&format!(": {reason}"));
        }
        return text;
    }
    if o.contains_key("Key") && o.len() <= 2 {
        return format!("{}={}", field(o, "Key"), field(o, "Value"));
    }
    if o.contains_key("IpAddress") && o.contains_key("Port") {
        let mut text = format!(
            "{}:{} {}",
            field(o, "IpAddress"),
            field(o, "Port"),
            field(o, "Protocol")
        );
        let path = field(o, "WebUrlPath");
        if !path.is_empty() {
            text.push_str(&format!(" {path}"));
        }
        return text;
    }
    o.iter()
        .filter_map(|(k, v)| scalar(v).map(|v| format!("{k}={v}")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A server's Host in a few words: OS, CPUs, memory, GPUs.
fn host_summary(host: &serde_json::Map<String, Value>) -> String {
    let part = |key: &str| host.get(key).and_then(Value::as_object);
    let mut parts = Vec::new();
    if let Some(os) = part("Os") {
        let name = [field(os, "Family"), field(os, "Name"), field(os, "Version")]
            .into_iter()
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join(" ");
        if !name.is_empty() {
            parts.push(name);
        }
    }
    if let Some(cpu) = part("CpuInfo") {
        let cpus = field(cpu, "NumberOfCpus");
        if !cpus.is_empty() {
            parts.push(
                format!("{cpus} CPU {}", field(cpu, "Architecture"))
                    .trim_end()
                    .to_owned(),
            );
        }
    }
    if let Some(memory) = part("Memory")
        && let Ok(bytes) = field(memory, "TotalBytes").parse::<u64>()
    {
        parts.push(format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30)));
    }
    if let Some(Value::Array(gpus)) = host.get("Gpus") {
        parts.extend(
            gpus.iter()
                .filter_map(Value::as_object)
                .map(|g| field(g, "ModelName"))
                .filter(|m| !m.is_empty()),
        );
    }
    parts.join(", ")
}

fn flatten(row: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Some(obj) = row.as_object() else {
        return vec![("Value".into(), row.to_string())];
    };
    for (key, value) in obj {
        if let Some(s) = scalar(value) {
            out.push((key.clone(), s));
        } else if let (Value::Object(inner), "Host") = (value, key.as_str()) {
            out.push((key.clone(), host_summary(inner)));
        } else if let Value::Object(inner) = value {
            for (k, v) in inner {
                if let Some(s) = scalar(v) {
                    out.push((format!("{key}.{k}"), s));
                } else if let Value::Array(items) = v {
                    // A screenshot's Images, one cell.
                    let parts: Vec<String> = items.iter().map(summary).collect();
                    out.push((format!("{key}.{k}"), parts.join("; ")));
                }
            }
        } else if let Value::Array(items) = value {
            let parts: Vec<String> = items
                .iter()
                .map(summary)
                .filter(|s| !s.is_empty())
                .collect();
            if !parts.is_empty() {
                let separator = if items.iter().all(Value::is_object) {
                    "; "
                } else {
                    ","
                };
                out.push((key.clone(), parts.join(separator)));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Columns line up on screen when a cell holds wide characters (CJK
    /// takes two columns a character): a server id or a hold's reason may.
    #[test]
    fn table_columns_line_up_with_wide_characters() {
        let reply = serde_json::json!({
            "Servers": [
                {"Id": "東京-1", "Availability": "AVAILABLE"},
                {"Id": "oslo-1", "Availability": "UNAVAILABLE"},
            ]
        });
        let text = table(&reply);
        // The display width of the text before the Availability cell.
        let width = |line: &str| -> usize {
            let at = line
                .find("AVAILABLE")
                .map(|i| if line[..i].ends_with("UN") { i - 2 } else { i });
            line[..at.unwrap_or_else(|| panic!("{text}"))]
                .chars()
                .map(|c| if c >= '\u{1100}' { 2 } else { 1 })
                .sum()
        };
        let rows: Vec<&str> = text.lines().filter(|l| l.contains("-1")).collect();
        assert_eq!(rows.len(), 2, "{text}");
        assert_eq!(width(rows[0]), width(rows[1]), "{text}");
    }

    /// Every cell a dry run prints, from a reply whose zeros and falses
    /// proto3 JSON left out.
    #[test]
    fn a_dry_run_reads_as_items_servers_sessions_and_capacity() {
        let reply = serde_json::json!({
            "RequestId": "r",
            "SuccessfulList": [{"ServerId": "g1"}],
            "UnsuccessfulList": [{
                "CloseServerRequestData": {"ServerId": "g2", "HoldName": "kernel"},
                "FailureCode": "CAPACITY_FLOOR",
                "FailureReason": "below its floor"
            }],
            "DryRun": true,
            "BlastRadius": {
                "Servers": [{"ServerId": "g1", "AvailableBefore": true, "Sessions": [
                    {"Id": "s1", "Owner": "alice", "Type": "VIRTUAL"}
                ]}],
                "Pools": [
                    {"TagKey": "pool", "AvailableBefore": 2, "AvailableAfter": 2},
                    {"TagKey": "pool", "TagValue": "gpu", "AvailableBefore": 3, "AvailableAfter": 2}
                ],
                "Overall": {"AvailableBefore": 5, "AvailableAfter": 4}
            }
        });
        let close = Command::CloseServers(crate::cli::CloseServersArgs {
            server_ids: "g1,g2".into(),
            force: false,
            reason: None,
            hold: None,
            expires_in: None,
            expires_at: None,
            expected_version: None,
            override_capacity_floor: false,
            dry: crate::cli::DryRunArgs {
                dry_run: true,
                capacity_tag: Some("pool".into()),
            },
            retry: crate::cli::RetryArgs { client_token: None },
        });
        let text = dry_run_table(&reply, &close);
        let rows: Vec<Vec<&str>> = text
            .lines()
            .map(|l| l.split_whitespace().collect())
            .collect();
        let has = |cells: &[&str]| rows.iter().any(|r| r == cells);
        assert!(
            text.starts_with("DRY RUN — nothing was changed\nRequestId: r\n"),
            "{text}"
        );
        assert!(
            has(&[
                "Items", "(2):", "1", "would", "succeed,", "1", "would", "fail"
            ]),
            "{text}"
        );
        assert!(has(&["g1", "OK"]), "{text}");
        assert!(
            has(&["g2", "CAPACITY_FLOOR", "below", "its", "floor"]),
            "{text}"
        );
        assert!(has(&["g1", "yes", "→", "no", "1"]), "{text}");
        assert!(has(&["g1", "s1", "alice", "VIRTUAL"]), "{text}");
        assert!(has(&["pool=(no", "tag)", "2", "→", "2", "0"]), "{text}");
        assert!(has(&["pool=gpu", "3", "→", "2", "-1"]), "{text}");
        assert!(has(&["all", "servers", "5", "→", "4", "-1"]), "{text}");
    }

    #[test]
    fn a_screenshots_images_are_summed_up_in_one_cell() {
        let reply = serde_json::json!({
            "RequestId": "r",
            "SuccessfulList": [{"SessionScreenshot": {"SessionId": "s1", "Images": [
                {"Format": "png", "File": "out/s1-0.png", "Primary": true,
                 "CreationTime": "2026-01-01T00:00:00Z"},
                {"Format": "jpeg", "File": "out/s1-1.jpeg"}
            ]}}]
        });
        let text = table(&reply);
        assert!(text.contains("SessionScreenshot.Images"), "{text}");
        assert!(
            text.contains("out/s1-0.png (png, primary); out/s1-1.jpeg (jpeg)"),
            "{text}"
        );
    }
}
