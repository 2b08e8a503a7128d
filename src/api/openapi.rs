//! `GET /openapi.json`: the OpenAPI 3.1 document of the whole HTTP API.
//!
//! The document is a static file, `openapi.json` beside this one, compiled
//! into the binary: reviewers read and diff it like any source, and tools
//! (schemathesis, client generators) take it as it is. Bounds that are
//! settings (`ingest.max_batch`, `max_metrics`, `max_labels`) are marked in
//! it with `"x-warden-limit": {"maxItems": "ingest.max_batch"}` and filled in
//! from this warden's settings when the router is built, so the served
//! document describes the server that serves it.
//!
//! Tests keep it honest: every route in the routers' source must be in the
//! document and every documented operation must be served (unit test below
//! and `tests/it/hostile.rs`).

use axum::Router;
use axum::body::Bytes;
use axum::http::header::CONTENT_TYPE;
use axum::routing::get;
use serde_json::Value;

use super::AppState;
use crate::config::Settings;

/// The document as written, with the default settings' bounds.
pub const DOCUMENT: &str = include_str!("openapi.json");

pub fn router(settings: &Settings) -> Router<AppState> {
    let body = Bytes::from(serde_json::to_vec(&document(settings)).expect("a JSON value serializes"));
    Router::new().route("/openapi.json", get(move || async move { ([(CONTENT_TYPE, "application/json")], body) }))
}

/// The document with this warden's version and settings filled in.
pub fn document(settings: &Settings) -> Value {
    let mut document: Value = serde_json::from_str(DOCUMENT).expect("src/api/openapi.json is valid JSON");
    document["info"]["version"] = Value::from(env!("CARGO_PKG_VERSION"));
    fill_limits(&mut document, settings);
    document
}

/// The value of a setting an `x-warden-limit` marker names.
fn setting(settings: &Settings, name: &str) -> Option<u64> {
    let value = match name {
        "ingest.max_batch" => settings.ingest.max_batch,
        "ingest.max_metrics" => settings.ingest.max_metrics,
        "ingest.max_labels" => settings.ingest.max_labels,
        _ => return None,
    };
    Some(value as u64)
}

fn fill_limits(value: &mut Value, settings: &Settings) {
    match value {
        Value::Object(object) => {
            if let Some(Value::Object(marks)) = object.get("x-warden-limit").cloned() {
                for (keyword, name) in marks {
                    let name = name.as_str().unwrap_or_default();
                    let limit = setting(settings, name).unwrap_or_else(|| panic!("unknown x-warden-limit {name}"));
                    object.insert(keyword, Value::from(limit));
                }
            }
            object.values_mut().for_each(|v| fill_limits(v, settings));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| fill_limits(v, settings)),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;
    use std::path::Path;

    use super::*;

    const METHODS: [&str; 7] = ["get", "post", "put", "patch", "delete", "head", "options"];

    /// (METHOD, path) of every operation in the document.
    fn documented() -> BTreeSet<(String, String)> {
        let document: Value = serde_json::from_str(DOCUMENT).unwrap();
        let mut out = BTreeSet::new();
        for (path, item) in document["paths"].as_object().unwrap() {
            for method in item.as_object().unwrap().keys().filter(|m| METHODS.contains(&m.as_str())) {
                out.insert((method.to_uppercase(), path.clone()));
            }
        }
        out
    }

    /// The text from just after `open` (an opening parenthesis) to its match.
    fn balanced(text: &str) -> &str {
        let mut depth = 1;
        for (i, c) in text.char_indices() {
            match c {
                '(' => depth += 1,
                ')' => {
                    depth -= 1;
                    if depth == 0 {
                        return &text[..i];
                    }
                }
                _ => {}
            }
        }
        text
    }

    /// Every `.route("path", method(handler)...)` in `source`.
    fn routes_in(source: &str) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for (at, _) in source.match_indices(".route(\"") {
            let rest = &source[at + ".route(\"".len()..];
            let path = &rest[..rest.find('"').unwrap()];
            let arguments = balanced(&rest[path.len() + 1..]);
            for method in METHODS {
                let mut from = 0;
                while let Some(i) = arguments[from..].find(&format!("{method}(")) {
                    let start = from + i;
                    let before = arguments[..start].chars().next_back();
                    if !before.is_some_and(|c| c.is_alphanumeric() || c == '_') {
                        out.push((method.to_uppercase(), path.to_string()));
                    }
                    from = start + method.len();
                }
            }
        }
        out
    }

    /// The routes the routers under src/api/ declare, with the /v1 prefix
    /// of the modules `router()` nests there (read from mod.rs).
    fn routes_in_source() -> BTreeSet<(String, String)> {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
        let mod_rs = std::fs::read_to_string(dir.join("mod.rs")).unwrap();
        let v1_block = {
            let start = mod_rs.find("let v1 = Router::new()").expect("mod.rs builds the /v1 router as `v1`");
            &mod_rs[start..start + mod_rs[start..].find(';').unwrap()]
        };
        let mut out = BTreeSet::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "rs") || path.file_name().is_some_and(|n| n == "mod.rs") {
                continue;
            }
            let module = path.file_stem().unwrap().to_str().unwrap().to_string();
            let source = std::fs::read_to_string(&path).unwrap();
            let nested = v1_block.contains(&format!("{module}::router("));
            for (method, route) in routes_in(&source) {
                let route = if nested { format!("/v1{route}") } else { route };
                out.insert((method, route));
            }
        }
        out
    }

    #[test]
    fn every_route_in_the_source_is_documented_and_nothing_else() {
        let source = routes_in_source();
        assert!(source.contains(&("POST".into(), "/v1/heartbeats".into())), "the scan finds routes: {source:?}");
        assert!(source.contains(&("GET".into(), "/healthz".into())), "{source:?}");
        let documented = documented();
        let undocumented: Vec<_> = source.difference(&documented).collect();
        assert!(undocumented.is_empty(), "routes missing from src/api/openapi.json: {undocumented:?}");
        let unserved: Vec<_> = documented.difference(&source).collect();
        assert!(unserved.is_empty(), "documented operations no router declares: {unserved:?}");
    }

    #[test]
    fn the_served_document_carries_the_settings() {
        let mut settings = Settings::defaults();
        settings.ingest.max_batch = 7;
        settings.ingest.max_metrics = 3;
        let document = document(&settings);
        let schemas = &document["components"]["schemas"];
        assert_eq!(schemas["HeartbeatBatch"]["allOf"][1]["properties"]["heartbeats"]["maxItems"], 7);
        assert_eq!(schemas["EventBatch"]["allOf"][1]["properties"]["events"]["maxItems"], 7);
        assert_eq!(schemas["Heartbeat"]["properties"]["metrics"]["maxProperties"], 3);
        assert_eq!(schemas["Heartbeat"]["properties"]["labels"]["maxProperties"], settings.ingest.max_labels);
        assert_eq!(document["info"]["version"], env!("CARGO_PKG_VERSION"));
        assert!(document["openapi"].as_str().unwrap().starts_with("3.1"));
    }

    #[test]
    fn the_documented_defaults_are_the_shipped_ones() {
        // The file as committed shows settings.toml's values, so it reads
        // right even where it is not served.
        let as_written: Value = serde_json::from_str(DOCUMENT).unwrap();
        let mut filled = document(&Settings::defaults());
        filled["info"]["version"] = as_written["info"]["version"].clone();
        assert_eq!(filled, as_written);
    }

    #[test]
    fn every_reference_resolves_and_every_error_is_the_error_shape() {
        let document: Value = serde_json::from_str(DOCUMENT).unwrap();
        fn walk(value: &Value, document: &Value) {
            match value {
                Value::Object(object) => {
                    if let Some(Value::String(reference)) = object.get("$ref") {
                        let pointer = reference.strip_prefix('#').expect("local references only");
                        assert!(document.pointer(pointer).is_some(), "{reference} does not resolve");
                    }
                    object.values().for_each(|v| walk(v, document));
                }
                Value::Array(items) => items.iter().for_each(|v| walk(v, document)),
                _ => {}
            }
        }
        walk(&document, &document);
        for (name, response) in document["components"]["responses"].as_object().unwrap() {
            assert_eq!(
                response["content"]["application/json"]["schema"]["$ref"], "#/components/schemas/Error",
                "{name}"
            );
        }
        for (path, item) in document["paths"].as_object().unwrap() {
            for (method, operation) in item.as_object().unwrap() {
                let responses = operation["responses"].as_object().unwrap();
                assert!(!responses.is_empty(), "{method} {path}");
                for status in responses.keys() {
                    assert!(status.len() == 3 && status.parse::<u16>().is_ok(), "{method} {path}: {status}");
                }
            }
        }
    }
}
