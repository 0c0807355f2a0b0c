//! Our OpenAPI document names every DCV path, method, operationId, tag,
//! schema, field and type as DCV Session Manager's own document does
//! (issue 15, acceptance 1). DCV's names and shapes are listed in
//! tests/fixtures/dcv-api-shapes.json (extracted from DCV's file, not a copy
//! of it); our document is the one the broker serves. Ours may have more
//! fields; where it differs from DCV on purpose, [`KNOWN_DIFFERENCES`] says
//! why, and each entry must still be a real difference.

use std::collections::BTreeSet;

use serde_json::Value;

/// Fields where our document knowingly differs from DCV's: schema, field,
/// why. Each must still differ (a fixed difference fails the test until
/// its entry is removed).
const KNOWN_DIFFERENCES: &[(&str, &str, &str)] = &[
    (
        "Session",
        "Server",
        "DCV references its full Server schema; its replies carry only \
         Id/Ip/Hostname/Port/Endpoints/WebUrlPath/Tags, which our \
         SessionServer has (checked below to be a subset of DCV's Server)",
    ),
    (
        "Session",
        "MaxConcurrentClients",
        "int32 in our proto (DCV: int64); every value of ours is a valid int64",
    ),
    (
        "Session",
        "NumOfConnections",
        "int32 in our proto (DCV: int64); every value of ours is a valid int64",
    ),
    (
        "CreateSessionRequestData",
        "MaxConcurrentClients",
        "int32 in our proto (DCV: int64); the accepted range is 1 to 100",
    ),
    (
        "CreateSessionRequestData",
        "InitFilePath",
        "DCV's deprecated alias of InitFile; not in our contract (a DCV \
         client sending it gets 400 naming the field)",
    ),
    (
        "GetSessionScreenshotRequestData",
        "MaxWidth",
        "int32 in our proto (DCV: int64); the accepted range is 1 to 4096",
    ),
    (
        "GetSessionScreenshotRequestData",
        "MaxHeight",
        "int32 in our proto (DCV: int64); the accepted range is 1 to 4096",
    ),
];

fn fixture() -> Value {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/dcv-api-shapes.json"
    );
    serde_json::from_str(&std::fs::read_to_string(path).expect("the fixture is readable"))
        .expect("the fixture is JSON")
}

fn ours() -> Value {
    yaml_serde::from_slice(dcv_broker::api::rest::openapi::document())
        .expect("the served document is YAML")
}

/// A schema in the fixture's notation (`string`, `integer/int64`,
/// `$Name`, `array<T>`), from our document.
fn shape(schema: &Value) -> String {
    if let Some(r) = schema["$ref"].as_str() {
        return format!("${}", r.trim_start_matches("#/components/schemas/"));
    }
    let ty = schema["type"].as_str().unwrap_or("?");
    if ty == "array" {
        return format!("array<{}>", shape(&schema["items"]));
    }
    match schema["format"].as_str() {
        Some(format) => format!("{ty}/{format}"),
        None => ty.to_owned(),
    }
}

/// Whether our shape says what DCV's says: the same type and references,
/// and DCV's format where DCV gives one (ours may be more specific).
fn matches(dcv: &str, ours: &str) -> bool {
    if let (Some(d), Some(o)) = (dcv.strip_prefix("array<"), ours.strip_prefix("array<")) {
        return matches(d.trim_end_matches('>'), o.trim_end_matches('>'));
    }
    if dcv.starts_with('$') || dcv.contains('/') {
        return dcv == ours;
    }
    ours == dcv || ours.split('/').next() == Some(dcv)
}

#[test]
fn every_dcv_operation_is_ours_by_the_same_names() {
    let dcv = fixture();
    let ours = ours();
    let operations = dcv["operations"].as_array().unwrap();
    assert_eq!(operations.len(), 9, "DCV's nine operations");
    for op in operations {
        let path = op["path"].as_str().unwrap();
        let method = op["method"].as_str().unwrap();
        let mine = &ours["paths"][path][method];
        assert!(
            mine.is_object(),
            "{method} {path}: missing from our document"
        );
        assert_eq!(mine["operationId"], op["operationId"], "{path}");
        assert_eq!(mine["tags"], serde_json::json!([op["tag"]]), "{path}: tag");
        let response = &mine["responses"]["200"]["content"]["application/json"]["schema"];
        assert_eq!(
            shape(response),
            op["response"].as_str().unwrap(),
            "{path}: 200"
        );
        match op.get("requestBody") {
            Some(body) => {
                let my_body = &mine["requestBody"];
                assert_eq!(
                    my_body["required"], body["required"],
                    "{path}: body required"
                );
                let schema = &my_body["content"]["application/json"]["schema"];
                assert_eq!(
                    shape(schema),
                    body["schema"].as_str().unwrap(),
                    "{path}: body"
                );
            }
            None => assert!(mine["requestBody"].is_null(), "{path}: no body"),
        }
        let dcv_params = op["parameters"].as_array().cloned().unwrap_or_default();
        let all_params = mine["parameters"].as_array().cloned().unwrap_or_default();
        // Beyond DCV: a batch route's request-level fields, as optional
        // query parameters (ClientToken, DryRun, CapacityTagKey); a DCV
        // client sends none of them.
        let (ours_only, my_params): (Vec<_>, Vec<_>) =
            all_params.into_iter().partition(|p| p["in"] == "query");
        for p in &ours_only {
            assert_eq!(p["required"], false, "{path}: {p}");
            let name = p["name"].as_str().unwrap();
            assert!(
                ["ClientToken", "DryRun", "CapacityTagKey"].contains(&name),
                "{path}: an unexpected query parameter {name}"
            );
        }
        if ["/closeServers", "/openServers", "/createSessions"].contains(&path) {
            assert!(
                ours_only.iter().any(|p| p["name"] == "ClientToken"),
                "{path}: ClientToken"
            );
        }
        assert_eq!(dcv_params.len(), my_params.len(), "{path}: parameters");
        for (d, m) in dcv_params.iter().zip(&my_params) {
            assert_eq!(m["name"], d["name"], "{path}");
            assert_eq!(m["in"], d["in"], "{path}");
            assert_eq!(m["required"], true, "{path}");
            assert_eq!(shape(&m["schema"]), d["schema"].as_str().unwrap(), "{path}");
        }
        // DCV's security applies: ours is the document-wide requirement.
        assert!(
            mine["security"].is_null(),
            "{path}: DCV's routes need a token"
        );
    }
    for (name, scheme) in dcv["securitySchemes"].as_object().unwrap() {
        assert_eq!(&ours["components"]["securitySchemes"][name], scheme);
    }
    for name in dcv["security"].as_array().unwrap() {
        let name = name.as_str().unwrap();
        assert_eq!(ours["security"], serde_json::json!([{ name: [] }]));
    }
}

#[test]
fn every_dcv_field_is_ours_with_the_same_type() {
    let dcv = fixture();
    let ours = ours();
    let my_schemas = &ours["components"]["schemas"];
    let mut differences = BTreeSet::new();
    for (schema, fields) in dcv["schemas"].as_object().unwrap() {
        let mine = &my_schemas[schema];
        assert!(
            mine.is_object(),
            "schema {schema}: missing from our document"
        );
        assert_eq!(mine["type"], "object", "{schema}");
        for (field, dcv_shape) in fields.as_object().unwrap() {
            let dcv_shape = dcv_shape.as_str().unwrap();
            let my_field = &mine["properties"][field];
            let my_shape = if my_field.is_null() {
                "(missing)".to_owned()
            } else {
                shape(my_field)
            };
            let known = KNOWN_DIFFERENCES
                .iter()
                .any(|(s, f, _)| s == schema && f == field);
            if known {
                assert!(
                    !matches(dcv_shape, &my_shape),
                    "{schema}.{field} now matches DCV ({dcv_shape}): remove it from \
                     KNOWN_DIFFERENCES"
                );
                differences.insert((schema.clone(), field.clone()));
            } else {
                assert!(
                    matches(dcv_shape, &my_shape),
                    "{schema}.{field}: DCV {dcv_shape}, ours {my_shape}"
                );
            }
        }
    }
    assert_eq!(
        differences.len(),
        KNOWN_DIFFERENCES.len(),
        "every known difference names a field DCV has"
    );
}

/// Our additions to DCV's schemas say so: a field DCV's schema does not
/// have is described as "Beyond DCV" (in its proto comment).
#[test]
fn our_additions_to_dcvs_schemas_are_marked_as_ours() {
    let dcv = fixture();
    let ours = ours();
    let mut additions = 0;
    for (schema, fields) in dcv["schemas"].as_object().unwrap() {
        let mine = ours["components"]["schemas"][schema]["properties"]
            .as_object()
            .unwrap();
        for (field, my_field) in mine {
            if fields.get(field).is_some() {
                continue;
            }
            additions += 1;
            let description = my_field["description"].as_str().unwrap_or_default();
            assert!(
                description.starts_with("Beyond DCV"),
                "{schema}.{field} is ours, not DCV's; its description should say \
                 so: {description:?}"
            );
        }
    }
    assert!(additions > 0, "Holds, Reason, ... are ours");
}

/// Our Session.Server (SessionServer) is DCV's Server with fewer fields:
/// every field it has is a field of DCV's Server, of the same type.
#[test]
fn a_sessions_server_is_a_part_of_dcvs_server() {
    let dcv = fixture();
    let ours = ours();
    let schemas = &ours["components"]["schemas"];
    assert_eq!(
        shape(&schemas["Session"]["properties"]["Server"]),
        "$SessionServer"
    );
    let dcv_server = dcv["schemas"]["Server"].as_object().unwrap();
    let mine = schemas["SessionServer"]["properties"].as_object().unwrap();
    assert!(!mine.is_empty());
    for (field, schema) in mine {
        let dcv_shape = dcv_server
            .get(field)
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("SessionServer.{field} is not a field of DCV's Server"));
        assert!(
            matches(dcv_shape, &shape(schema)),
            "SessionServer.{field}: DCV's Server {dcv_shape}, ours {}",
            shape(schema)
        );
    }
}

#[test]
fn the_comparison_can_fail() {
    assert!(matches("integer", "integer/int32"));
    assert!(!matches("integer/int64", "integer/int32"));
    assert!(!matches("string", "integer"));
    assert!(!matches("$Server", "$SessionServer"));
    assert!(matches("array<$Gpu>", "array<$Gpu>"));
    assert!(!matches("array<string>", "string"));
    assert!(!matches("string", "(missing)"));
    assert!(matches("string", "string/byte"));
}
