//! Test-only formatter of the world `siem-formatter` (the formatter world's earlier name),
//! bound directly with wit-bindgen to the legacy WIT the host keeps: NDJSON of the events,
//! with an `x-legacy-formatter: 1` header. It must never be part of a production bundle.
#![allow(unsafe_code)]

wit_bindgen::generate!({
    path: "../../wit/legacy/siem-formatter-0.2.0",
    world: "siem-formatter",
});

use exports::intentgate::plugin::formatter::Guest;
use intentgate::plugin::types::FormattedRequest;

struct Legacy;

impl Guest for Legacy {
    fn configure(_config: String) -> Result<(), String> {
        Ok(())
    }

    fn format(events: Vec<String>) -> Result<FormattedRequest, String> {
        let mut body = events.join("\n");
        body.push('\n');
        Ok(FormattedRequest {
            content_type: "application/x-ndjson".into(),
            headers: vec![("x-legacy-formatter".into(), "1".into())],
            body: body.into_bytes(),
        })
    }
}

export!(Legacy);
